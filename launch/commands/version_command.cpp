// `moeforge version`: the build and runtime facts a bug report or benchmark report needs.
#include "launch/commands/commands.h"

#include "core/kernels/kernels.h"

#include <fmt/format.h>
#include <mpi.h>
#include <spdlog/version.h>
#include <torch/version.h>
#include <yaml-cpp/yaml.h>

#include <iostream>

namespace moeforge {

int run_version() {
  char mpi_version[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(mpi_version, &length);  // callable before MPI_Init
  std::string mpi(mpi_version, static_cast<size_t>(length));
  mpi = mpi.substr(0, mpi.find_first_of(",\n"));
#ifdef MOEFORGE_WITH_CUDA
  const bool cuda_build = true;
#else
  const bool cuda_build = false;
#endif
  const bool cuda_available = torch::cuda::is_available();
  std::cout << fmt::format("moeforge {}\n", MOEFORGE_VERSION);
  std::cout << fmt::format("  compiler     {} {}\n", "gcc", __VERSION__);
  std::cout << fmt::format("  LibTorch     {}\n", TORCH_VERSION);
  std::cout << fmt::format("  CUDA build   {}\n", cuda_build ? "yes" : "no (CPU only)");
  std::cout << fmt::format("  GPUs visible {}\n", cuda_available ? static_cast<int>(torch::cuda::device_count()) : 0);
  std::cout << fmt::format("  CPU threads  {} (LibTorch intra-op)\n", at::get_num_threads());
  std::cout << fmt::format("  MPI          {}\n", mpi);
  std::cout << fmt::format("  spdlog       {}.{}.{}\n", SPDLOG_VER_MAJOR, SPDLOG_VER_MINOR, SPDLOG_VER_PATCH);
  std::cout << fmt::format("  kernels      {}\n", kernels::describe_kernels());
  return 0;
}

}  // namespace moeforge
