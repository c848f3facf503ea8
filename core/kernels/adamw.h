// defines: AdamWHyper, AdamWTensors, adamw_step (and its reference)
//
// AdamW over many tensors in one pass each (Apex's multi_tensor_apply role): per element the
// decoupled weight decay, both moments, the bias-corrected step on the fp32 master weight and,
// where the model runs in bf16, the bf16 copy rounded from it, all from one read of the
// optimizer state. The CPU kernel walks fixed chunks of every tensor in parallel; the CUDA kernel
// is one launch over a table of chunks. The reference is the LibTorch composition (torch.optim's
// single-tensor order of operations), then the copy into the bf16 weight.
//
// The fused math is the same on every path (the vector body, the scalar tail and CUDA use the same
// fused multiply-adds, an IEEE sqrt and division), so an element's update does not depend on
// where a tensor is cut: ZeRO's shards update exactly as the whole tensor.
#pragma once

#include "core/config/config.h"

#include <torch/torch.h>

#include <vector>

namespace moeforge::kernels {

// One step's scalars: training.* and the learning rate; `step` counts from 1.
struct AdamWHyper {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  int64_t step = 1;
  static AdamWHyper of(const TrainingConfig& t, double lr, int64_t step) {
    return {lr, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay, step};
  }
};

// One tensor's update: w (the fp32 master, or the fp32 parameter itself), its fp32 gradient g and
// moments, all contiguous and of one size; `copy` (optional, bf16, as many elements) receives w
// rounded to bf16. `decay`: whether weight decay applies (not to biases and norms).
struct AdamWTensors {
  torch::Tensor w, g, exp_avg, exp_avg_sq, copy;
  bool decay = true;
};

// Fused or reference (model.kernels), by the tensors' device.
void adamw_step(const std::vector<AdamWTensors>& tensors, const AdamWHyper& hyper);
void adamw_step_reference(const std::vector<AdamWTensors>& tensors, const AdamWHyper& hyper);
void adamw_step_fused(const std::vector<AdamWTensors>& tensors, const AdamWHyper& hyper);

}  // namespace moeforge::kernels
