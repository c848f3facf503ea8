// defines: KernelCheck, check_kernels, agree_and_disable, self_check
//
// A fused kernel checks itself once per process, before training uses it: on a small input on the
// training device (well under a millisecond each), fp32 and bf16, its outputs and input gradients
// against its reference composition. No GPU is attached where the project is built and tested, so
// this is what stands between a CUDA kernel that compiled and a wrong result on real hardware. On
// disagreement (or an exception) the kernel is disabled on that device type with a warning naming
// it, the error and the shapes, and its reference runs instead. The verdicts are agreed across
// ranks first, so that one failure anywhere makes every rank use the reference and a distributed
// run stays equal to the single-process run. The cases, the comparison and the tolerances are
// kernel_checks.h's, at its start-up shapes; `moeforge check kernels` runs them at more shapes.
#pragma once

#include "core/kernels/kernels.h"

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

namespace moeforge::kernels {

struct KernelCheck {
  Kernel kernel;
  bool ok = true;
  double error = 0;    // the worst norm-wise error |a - b| / |b| over outputs and gradients
  std::string detail;  // dtype and shapes, or the exception
};

// Checks every kernel that runs fused on device.type(); the others are left out.
std::vector<KernelCheck> check_kernels(const torch::Device& device);

// `max_over_ranks` returns the element-wise maximum of its argument over every rank (identity on
// one process). Disables on `device` each kernel that failed on any rank; returns their names.
using MaxOverRanks = std::function<std::vector<int64_t>(const std::vector<int64_t>&)>;
std::vector<std::string> agree_and_disable(const std::vector<KernelCheck>& checks, c10::DeviceType device,
                                           const MaxOverRanks& max_over_ranks);

// Both, with a log line of what was checked. Collective when max_over_ranks is.
void self_check(const torch::Device& device, const MaxOverRanks& max_over_ranks);

}  // namespace moeforge::kernels
