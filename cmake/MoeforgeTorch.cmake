# LibTorch from the pinned PyPI torch wheel in the project venv (launch/setup.sh makes `.venv`).
#
# We build our own imported targets from the wheel's headers and libraries instead of calling
# find_package(Torch): the wheel's CMake package insists on a matching CUDA toolkit whenever the
# wheel was built with CUDA, which would make a CPU-only configuration impossible on machines
# without nvcc. Outputs:
#   moeforge::torch      interface target (headers as SYSTEM, libc10 + libtorch_cpu [+ CUDA libs])
#   MOEFORGE_WITH_CUDA   ON when nvcc exists and its CUDA major version equals the wheel's
#   moeforge_use_torch_pch(target)  attaches the shared precompiled LibTorch header
# LibTorch 2.11 is the floor (the GPU machines' torch). -DMOEFORGE_TORCH_ROOT=DIR compiles against
# another torch package directory; one with headers only (launch/torch_headers.sh) can only be
# checked, with -DMOEFORGE_SYNTAX_ONLY=ON (launch/check_torch_floor.sh, which CI runs).

set(MOEFORGE_VENV "${CMAKE_SOURCE_DIR}/.venv" CACHE PATH "Python venv holding the torch wheel")
set(MOEFORGE_TORCH_ROOT "" CACHE PATH
    "A torch package directory (include/, optionally lib/ and version.py) to compile against instead of the venv's")
option(MOEFORGE_SYNTAX_ONLY "Compile the C++ sources with -fsyntax-only and link nothing (checks another LibTorch's headers)" OFF)
set(MOEFORGE_TORCH_FLOOR 2.11)
set(_py "${MOEFORGE_VENV}/bin/python")
if(NOT EXISTS "${_py}")
  message(FATAL_ERROR "No Python venv at ${MOEFORGE_VENV}. Run `bash launch/setup.sh` first "
                      "(or pass -DMOEFORGE_VENV=/path/to/venv with torch installed).")
endif()
execute_process(
  COMMAND "${_py}" -c "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__); print(torch.version.cuda or ''); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _torch_out ERROR_VARIABLE _torch_err RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "Cannot import torch from ${_py}: ${_torch_err}\nRun `bash launch/setup.sh`.")
endif()
string(REPLACE "\n" ";" _torch_out "${_torch_out}")
list(GET _torch_out 0 _venv_torch)
# The wheels of NCCL and the CUDA runtime sit beside torch in the venv, whichever torch is compiled.
get_filename_component(MOEFORGE_NVIDIA_ROOT "${_venv_torch}/../nvidia" ABSOLUTE)
if(NOT MOEFORGE_TORCH_ROOT)
  set(_torch_root "${_venv_torch}")
  list(GET _torch_out 1 MOEFORGE_TORCH_VERSION)
  list(GET _torch_out 2 _torch_cuda)
  list(GET _torch_out 3 _torch_abi)
else()
  # Another tree (launch/torch_headers.sh makes one from a wheel): its version from the headers,
  # its CUDA from the wheel's version.py; every wheel since 2.7 uses the C++11 ABI.
  set(_torch_root "${MOEFORGE_TORCH_ROOT}")
  set(_version_h "${_torch_root}/include/torch/headeronly/version.h")
  if(NOT EXISTS "${_version_h}")
    message(FATAL_ERROR "MOEFORGE_TORCH_ROOT=${_torch_root} holds no LibTorch >= ${MOEFORGE_TORCH_FLOOR} headers "
                        "(${_version_h} is missing). Point it at a torch package directory, e.g. the one "
                        "launch/torch_headers.sh prints.")
  endif()
  set(MOEFORGE_TORCH_VERSION "")
  foreach(_part MAJOR MINOR PATCH)
    file(STRINGS "${_version_h}" _v REGEX "#define TORCH_VERSION_${_part} ")
    string(REGEX MATCH "[0-9]+$" _n "${_v}")
    string(APPEND MOEFORGE_TORCH_VERSION "${_n}.")
  endforeach()
  string(REGEX REPLACE "\\.$" "" MOEFORGE_TORCH_VERSION "${MOEFORGE_TORCH_VERSION}")
  set(_torch_cuda "")
  if(EXISTS "${_torch_root}/version.py")
    file(STRINGS "${_torch_root}/version.py" _v REGEX "^cuda")
    string(REGEX MATCH "'([0-9.]+)'" _ "${_v}")
    set(_torch_cuda "${CMAKE_MATCH_1}")
  endif()
  set(_torch_abi 1)
endif()
string(REGEX MATCH "^[0-9]+\\.[0-9]+" _torch_mm "${MOEFORGE_TORCH_VERSION}")
if(_torch_mm VERSION_LESS MOEFORGE_TORCH_FLOOR)
  message(FATAL_ERROR "LibTorch ${MOEFORGE_TORCH_VERSION} from ${_torch_root} is older than moeforge's floor "
                      "${MOEFORGE_TORCH_FLOOR}. Install torch>=${MOEFORGE_TORCH_FLOOR} in the venv (launch/requirements-torch.txt).")
endif()
set(_torch_libs_present OFF)
if(EXISTS "${_torch_root}/lib/libtorch_cpu.so")
  set(_torch_libs_present ON)
elseif(NOT MOEFORGE_SYNTAX_ONLY)
  message(FATAL_ERROR "${_torch_root} holds LibTorch headers but no lib/libtorch_cpu.so: a header tree can only check "
                      "the sources (-DMOEFORGE_SYNTAX_ONLY=ON, as launch/check_torch_floor.sh does).")
endif()
set(MOEFORGE_TORCH_DIR "${_torch_root}")
set(MOEFORGE_TORCH_NOTE "")
if(MOEFORGE_SYNTAX_ONLY)
  set(MOEFORGE_TORCH_NOTE " (syntax check only: nothing is compiled or linked)")
endif()

add_library(moeforge_torch INTERFACE)
add_library(moeforge::torch ALIAS moeforge_torch)
# The wheel bundles its own fmt (12.x) next to its headers; Debian's spdlog is built against
# Debian's fmt 9. Expose the wheel's include tree through a mirror without `fmt/`, so
# <fmt/...> always resolves to the system copy spdlog was compiled with.
set(_torch_inc "${CMAKE_BINARY_DIR}/torch-include")
file(MAKE_DIRECTORY "${_torch_inc}")
file(GLOB _torch_inc_entries RELATIVE "${_torch_root}/include" "${_torch_root}/include/*")
foreach(_entry IN LISTS _torch_inc_entries)
  if(NOT _entry MATCHES "^(fmt|google)$" AND NOT EXISTS "${_torch_inc}/${_entry}")
    file(CREATE_LINK "${_torch_root}/include/${_entry}" "${_torch_inc}/${_entry}" SYMBOLIC)
  endif()
endforeach()
target_include_directories(moeforge_torch SYSTEM INTERFACE
  "${_torch_inc}" "${_torch_root}/include/torch/csrc/api/include")
target_compile_definitions(moeforge_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_torch_abi})
set(_torch_lib "${_torch_root}/lib")
if(_torch_libs_present)
  target_link_libraries(moeforge_torch INTERFACE
    "${_torch_lib}/libtorch.so" "${_torch_lib}/libtorch_cpu.so" "${_torch_lib}/libc10.so" Threads::Threads)
  target_link_options(moeforge_torch INTERFACE "LINKER:-rpath,${_torch_lib}")
endif()

# ---- CUDA: only when nvcc's major version equals the wheel's (two CUDA runtimes in one process
# ---- would otherwise be loaded).
option(MOEFORGE_ENABLE_CUDA "Build the GPU path when nvcc matches the torch wheel's CUDA" ON)
set(MOEFORGE_WITH_CUDA OFF)
find_program(MOEFORGE_NVCC nvcc HINTS /usr/local/cuda/bin)
if(NOT MOEFORGE_ENABLE_CUDA)
  set(MOEFORGE_CUDA_NOTE "disabled by -DMOEFORGE_ENABLE_CUDA=OFF")
elseif(NOT _torch_cuda)
  set(MOEFORGE_CUDA_NOTE "disabled: the torch wheel is CPU-only")
elseif(NOT MOEFORGE_NVCC)
  set(MOEFORGE_CUDA_NOTE "disabled: no nvcc found (torch wheel has CUDA ${_torch_cuda})")
else()
  execute_process(COMMAND "${MOEFORGE_NVCC}" --version OUTPUT_VARIABLE _nvcc_out)
  string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _ "${_nvcc_out}")
  set(_nvcc_major "${CMAKE_MATCH_1}")
  set(_nvcc_ver "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
  string(REGEX MATCH "^[0-9]+" _torch_cuda_major "${_torch_cuda}")
  if(NOT _nvcc_major STREQUAL _torch_cuda_major)
    set(MOEFORGE_CUDA_NOTE "disabled: nvcc ${_nvcc_ver} does not match the torch wheel's CUDA ${_torch_cuda}")
  else()
    set(MOEFORGE_WITH_CUDA ON)
    set(MOEFORGE_CUDA_NOTE "enabled (nvcc ${_nvcc_ver}, torch wheel CUDA ${_torch_cuda}); GPU tests skip without a GPU")
  endif()
endif()
if(MOEFORGE_WITH_CUDA)
  # Hopper (H100/H200) first; override with -DCMAKE_CUDA_ARCHITECTURES.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  set(CMAKE_CUDA_COMPILER "${MOEFORGE_NVCC}")
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 20)
  find_package(CUDAToolkit REQUIRED)
  # --no-as-needed: nothing references libtorch_cuda's symbols directly, but loading it is what
  # registers the CUDA kernels with the dispatcher.
  if(_torch_libs_present)
    target_link_libraries(moeforge_torch INTERFACE
      -Wl,--no-as-needed "${_torch_lib}/libtorch_cuda.so" "${_torch_lib}/libc10_cuda.so" -Wl,--as-needed)
  endif()
  target_compile_definitions(moeforge_torch INTERFACE MOEFORGE_WITH_CUDA=1)
endif()

# ---- One precompiled LibTorch header, shared by every target that includes torch.
add_library(moeforge_pch OBJECT "${CMAKE_SOURCE_DIR}/cmake/pch.cpp")
target_link_libraries(moeforge_pch PRIVATE moeforge_torch moeforge_warnings)
target_precompile_headers(moeforge_pch PRIVATE "${CMAKE_SOURCE_DIR}/cmake/torch_pch.h")
# A syntax check of another LibTorch (launch/check_torch_floor.sh): every C++ source of the targets
# made after this point is parsed, nothing is compiled or linked; the precompiled header above is
# still built for real, so each source parses in seconds.
if(MOEFORGE_SYNTAX_ONLY)
  add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fsyntax-only>)
endif()
function(moeforge_use_torch_pch target)
  target_precompile_headers(${target} REUSE_FROM moeforge_pch)
endfunction()
