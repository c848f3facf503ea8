// The kernel self-check's verdict under mpirun: a kernel that fails on one rank only is disabled on
// every rank (so a distributed run keeps running one math), through the trainer's MAX all-reduce.
#include "core/kernels/self_check.h"
#include "parallel/comm/mpi_communicator.h"

#include <catch2/catch.hpp>

using namespace moeforge;

TEST_CASE("kernel self-check: one rank's failure disables the kernel on every rank", "[mpi]") {
  static auto w = MpiCommunicator::world(60.0);
  const auto max_over_ranks = [&](const std::vector<int64_t>& failed) {
    auto t = torch::tensor(failed, torch::kInt64);
    w->all_reduce(t, ReduceOp::max);
    return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
  };
  // The last rank's permute kernel "fails"; the CUDA device type, so this process's CPU kernels
  // stay as they are.
  std::vector<kernels::KernelCheck> mine{{kernels::Kernel::permute, w->rank() != w->size() - 1, 0.1, "fp32 [24, 32]"}};
  const auto disabled = kernels::agree_and_disable(mine, c10::DeviceType::CUDA, max_over_ranks);
  CHECK(disabled == std::vector<std::string>{"permute"});
  CHECK_FALSE(kernels::fused(kernels::Kernel::permute, c10::DeviceType::CUDA));
  // Nothing failed anywhere: nothing is disabled.
  CHECK(kernels::agree_and_disable({{kernels::Kernel::swiglu, true, 0, ""}}, c10::DeviceType::CUDA, max_over_ranks).empty());
}
