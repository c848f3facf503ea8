// defines: StepProfiler
//
// Megatron's --profile: iterations [logging.profile_step_start, logging.profile_step_end) of rank
// 0 recorded by LibTorch's Kineto profiler (CPU operators; on a GPU also every kernel), written
// when the last of them ends:
//   <run_dir>/profile/trace.json      a Chrome trace (chrome://tracing or ui.perfetto.dev)
//   <run_dir>/profile/top_ops.txt     operators and kernels by self time (without the operators
//                                     they call), with call counts and their share of the wall time
// Off by default (logging.profile: false); costs nothing when off.
#pragma once

#include "core/config/config.h"

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace moeforge {

class StepProfiler {
 public:
  StepProfiler(const LoggingConfig& config, bool this_rank, const torch::Device& device);
  // Around each iteration (1-based): starts before the first profiled one, stops and writes after
  // the last.
  void before_step(int64_t iteration);
  void after_step(int64_t iteration);

 private:
  bool enabled_ = false, running_ = false;
  torch::Device device_;
  int64_t start_ = 0, end_ = 0;
  std::filesystem::path dir_;
  double wall_start_s_ = 0;
};

// The top-ops table of a profile, from (name, device, total ns, calls) rows; for tests.
struct ProfiledOp {
  std::string name;
  bool device = false;  // a GPU kernel or copy; false for a CPU operator
  double total_us = 0;  // self time
  int64_t calls = 0;
};
std::string top_ops_table(std::vector<ProfiledOp> ops, double wall_us, size_t rows = 30);

}  // namespace moeforge
