// defines: TrainableParameter, select_trainable, AdamW
//
// The optimizer side of training, independent of the model's structure: which parameters train
// (freezing by name glob), and AdamW with decoupled weight decay over fp32 master weights.
// When the model runs in bf16, each micro-batch's bf16 gradients are accumulated into an fp32
// main-grad buffer (as Megatron's DDP does) and the fp32 master copy is what Adam updates; the
// model's bf16 weights are then copied from it. In fp32 the parameter is its own master.
#pragma once

#include "core/config.h"
#include "core/safetensors.h"

#include <torch/torch.h>

#include <string>
#include <vector>

namespace moeforge {

struct TrainableParameter {
  std::string name;
  torch::Tensor param;
  bool weight_decay = true;  // false for biases and 1-D tensors (norms), as Megatron
};

// The parameters of `named` that train under training.trainable / training.frozen (globs with `*`
// and `?`). Sets requires_grad(false) on the frozen ones, so they get no gradient. Throws
// UserError when a pattern matches no parameter (a typo would otherwise freeze nothing) or when
// nothing is left to train.
std::vector<TrainableParameter> select_trainable(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                                                 const TrainingConfig& training);

bool glob_match(std::string_view pattern, std::string_view text);

class AdamW {
 public:
  AdamW(std::vector<TrainableParameter> params, const TrainingConfig& training);

  // After a micro-batch's backward: moves bf16 gradients into the fp32 accumulators (fp32
  // gradients accumulate in place in .grad and need nothing).
  void accumulate_grads();
  // The fp32 gradient of every trainable parameter, in parameter order (zeros where a parameter
  // got none), for reduction across ranks in place.
  std::vector<torch::Tensor> gradients();
  // Global L2 norm of the accumulated gradients, every trainable parameter counted once.
  double grad_norm() const;
  // Scales every gradient by clip / (norm + 1e-6) when that is below 1 (Megatron, torch).
  void clip_grads(double norm, double clip);
  // One AdamW update at learning rate `lr`, then zeroes the gradients.
  void step(double lr);
  // Drops the accumulated gradients without an update (a skipped iteration).
  void zero_grads();

  int64_t steps() const { return steps_; }
  const std::vector<TrainableParameter>& params() const { return params_; }
  int64_t num_trainable_elements() const;

  // Optimizer state for checkpoints: exp_avg.<name>, exp_avg_sq.<name> and, in bf16,
  // master.<name>; `steps` goes with the trainer's state.
  NamedTensors state() const;
  // Restores state(); throws UserError naming every missing or mis-shaped tensor.
  void load_state(const SafetensorsFile& file, int64_t steps);

 private:
  torch::Tensor& grad(size_t i);  // the fp32 gradient of parameter i

  std::vector<TrainableParameter> params_;
  std::vector<torch::Tensor> master_, main_grad_, exp_avg_, exp_avg_sq_;  // master/main_grad: bf16 only
  double beta1_, beta2_, eps_, weight_decay_;
  int64_t steps_ = 0;
};

}  // namespace moeforge
