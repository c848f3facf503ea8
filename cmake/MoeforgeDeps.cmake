# System dependencies from Debian packages (launch/setup.sh installs them).
find_package(MPI REQUIRED COMPONENTS C)
# Open MPI 5's wrapper compiles with -pthread, which only defines _REENTRANT (glibc has its threads
# built in) but voids the precompiled LibTorch header for every target that uses MPI.
get_target_property(_mpi_options MPI::MPI_C INTERFACE_COMPILE_OPTIONS)
if(_mpi_options)
  list(FILTER _mpi_options EXCLUDE REGEX "-pthread$")  # also its CUDA form, "...-Xcompiler >-pthread"
  set_property(TARGET MPI::MPI_C PROPERTY INTERFACE_COMPILE_OPTIONS "${_mpi_options}")
endif()
find_package(yaml-cpp REQUIRED)
find_package(spdlog REQUIRED)
find_package(CLI11 REQUIRED)
find_package(nlohmann_json 3 REQUIRED)
find_package(Threads REQUIRED)
# OpenSSL's libcrypto (libssl-dev): the SHA-256 of a run's resolved config in its fingerprint.
find_package(OpenSSL REQUIRED COMPONENTS Crypto)
# PCRE2 (8-bit) and utf8proc: the tokenizer's pre-tokenizer regexes and NFC normalization.
find_package(PkgConfig REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
pkg_check_modules(UTF8PROC REQUIRED IMPORTED_TARGET libutf8proc)
# TensorBoard event files (logging.tensorboard_dir): protobuf (lite runtime) encodes the events and
# Boost.CRC checksums them. Optional: a build without them refuses the key at start-up.
find_package(Protobuf QUIET)
find_package(Boost 1.71 QUIET)
if(Protobuf_FOUND AND Protobuf_PROTOC_EXECUTABLE AND Boost_FOUND)
  set(MOEFORGE_WITH_TENSORBOARD ON)
  set(MOEFORGE_TENSORBOARD_NOTE "protobuf ${Protobuf_VERSION}, Boost ${Boost_VERSION}")
else()
  set(MOEFORGE_WITH_TENSORBOARD OFF)
  set(MOEFORGE_TENSORBOARD_NOTE "off (needs libprotobuf-dev, protobuf-compiler and libboost-dev)")
endif()
if(MOEFORGE_BUILD_TESTS)
  find_package(Catch2 2 REQUIRED)
  include(Catch)
endif()
# yaml-cpp 0.7's package exports the plain `yaml-cpp` target name.
if(NOT TARGET yaml-cpp::yaml-cpp)
  add_library(yaml-cpp::yaml-cpp ALIAS yaml-cpp)
endif()
# The MPI C API only: skip the deprecated C++ bindings mpi.h would otherwise pull in.
add_library(moeforge_mpi INTERFACE)
add_library(moeforge::mpi ALIAS moeforge_mpi)
target_link_libraries(moeforge_mpi INTERFACE MPI::MPI_C)
target_compile_definitions(moeforge_mpi INTERFACE OMPI_SKIP_MPICXX=1 MPICH_SKIP_MPICXX=1)
