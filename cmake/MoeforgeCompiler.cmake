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

# MOEFORGE_DEBUG_INFO (CMakeLists.txt): the -g of the build type's flags replaced by its level,
# for C++ only (nvcc's -g is host-side and its objects are few).
if(NOT MOEFORGE_DEBUG_INFO MATCHES "^(full|lines|none)$")
  message(FATAL_ERROR "MOEFORGE_DEBUG_INFO is '${MOEFORGE_DEBUG_INFO}': use full, lines or none")
endif()
if(NOT MOEFORGE_DEBUG_INFO STREQUAL "full")
  set(_level -g1)
  if(MOEFORGE_DEBUG_INFO STREQUAL "none")
    set(_level -g0)
  endif()
  string(TOUPPER "${CMAKE_BUILD_TYPE}" _type)
  string(REGEX REPLACE "(^| )-g( |$)" "\\1${_level}\\2" CMAKE_CXX_FLAGS_${_type} "${CMAKE_CXX_FLAGS_${_type}}")
endif()
# CMAKE_UNITY_BUILD=ON (the quickstart's): each library compiles its sources in batches, one
# precompiled-header load and one set of template instantiations per batch instead of per file.
if(CMAKE_UNITY_BUILD)
  if(NOT CMAKE_UNITY_BUILD_BATCH_SIZE)
    set(CMAKE_UNITY_BUILD_BATCH_SIZE 8)
  endif()
  # GCC's -Wmaybe-uninitialized depends on inlining, which a batch changes: it then reports
  # false positives (a std::optional read after its check) that file-by-file builds, CI's
  # included, do not; those keep the warning.
  add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-Wno-maybe-uninitialized>)
  set(MOEFORGE_UNITY_NOTE ", unity batches of ${CMAKE_UNITY_BUILD_BATCH_SIZE}")
endif()
