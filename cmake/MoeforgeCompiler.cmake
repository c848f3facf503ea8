# Compiler warnings and ccache. Warnings are the same everywhere; CI makes them errors.
find_program(CCACHE_PROGRAM ccache)
if(CCACHE_PROGRAM)
  # The sloppiness settings let ccache cache objects built with a precompiled header; BASEDIR
  # and NOHASHDIR let a fresh clone in another directory hit the cache.
  set(_launcher ${CMAKE_COMMAND} -E env
      "CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime"
      "CCACHE_BASEDIR=${CMAKE_SOURCE_DIR}" "CCACHE_NOHASHDIR=1" ${CCACHE_PROGRAM})
  set(CMAKE_CXX_COMPILER_LAUNCHER ${_launcher})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${_launcher})
  set(MOEFORGE_CCACHE_NOTE " (ccache)")
else()
  set(MOEFORGE_CCACHE_NOTE " (no ccache: full rebuilds will be slow)")
endif()

add_library(moeforge_warnings INTERFACE)
target_compile_options(moeforge_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wcast-align
                            -Woverloaded-virtual -Wimplicit-fallthrough>)
if(MOEFORGE_WERROR)
  target_compile_options(moeforge_warnings INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  set(MOEFORGE_WARNINGS_NOTE "-Wall -Wextra -Wpedantic ... as errors")
else()
  set(MOEFORGE_WARNINGS_NOTE "-Wall -Wextra -Wpedantic ... (not errors; -DMOEFORGE_WERROR=ON in CI)")
endif()
