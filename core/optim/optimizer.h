// defines: TrainableParameter, select_trainable, optimizer_state_parameter, StateLookup,
//          Optimizer, AdamW
//
// The optimizer side of training, independent of the model's structure: which parameters train
// (freezing by name glob), and AdamW with decoupled weight decay over fp32 master weights
// (the update itself: kernels::adamw_step, shared with the sharded optimizer).
// When the model runs in bf16, each micro-batch's gradients are accumulated into an fp32 main-grad
// buffer (as Megatron's DDP does) and the fp32 master copy is what Adam updates; the model's bf16
// weights are then copied from it. The buffers are attached to the fused weight-gradient ops
// (kernels/wgrad_accumulation.h), whose GEMMs accumulate into them in fp32; the other gradients
// arrive in bf16 .grad and are added after each micro-batch. In fp32 the parameter is its own
// master.
#pragma once

#include "core/config/config.h"
#include "core/files/safetensors.h"

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

struct TrainableParameter {
  std::string name;
  torch::Tensor param;
  bool weight_decay = true;      // false for biases and 1-D tensors (norms), as Megatron
  bool expert_parallel = false;  // split over expert-parallel ranks (routed experts): reduced over EDP
  // Split over tensor-parallel ranks (heads, FFN and expert widths): each rank's squares add to
  // the norm; a parameter whole on every TP rank counts once.
  bool tensor_parallel = false;
  // Whole on every TP rank but fed only this rank's chunk of the sequence (sequence parallelism):
  // its gradient is summed over the TP ranks after the data-parallel reduction.
  bool sequence_parallel = false;
};

// Squared L2 norms of one rank's gradients, by how they add up over ranks.
struct GradSquares {
  double whole = 0;   // dense parameters whole on every tensor-parallel rank
  double split = 0;   // dense parameters split over the tensor-parallel ranks
  double expert = 0;  // expert-parallel parameters (split over TP too when TP > 1)
};

// The parameters of `named` that train under training.trainable / training.frozen (globs with `*`
// and `?`). Sets requires_grad(false) on the frozen ones, so they get no gradient. Throws
// UserError when a pattern matches no parameter (a typo would otherwise freeze nothing) or when
// nothing is left to train.
std::vector<TrainableParameter> select_trainable(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                                                 const TrainingConfig& training);

bool glob_match(std::string_view pattern, std::string_view text);

// The parameter an optimizer-state tensor belongs to (Optimizer::state() names it
// exp_avg.<parameter>, exp_avg_sq.<parameter> or master.<parameter>); any other name as it is.
std::string_view optimizer_state_parameter(std::string_view name);

// Looks up a tensor of a saved optimizer state by name, as fp32 and shaped like this rank's
// parameter (expert-parallel tensors already cut to this rank's experts); nullopt when absent.
using StateLookup = std::function<std::optional<torch::Tensor>(const std::string& name)>;

// What the trainer drives, one process or many: accumulate over micro-batches, reduce over the
// data-parallel ranks, norm, clip, step.
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // After a micro-batch's backward: moves the parameters' gradients into fp32 accumulators.
  virtual void accumulate_grads() = 0;
  // Before the last micro-batch's backward through parameters `params` (indices into params();
  // with interleaved pipeline stages each model chunk has its own last backward): where gradients
  // are reduced while that backward runs (parallel.overlap_comm), their hooks start doing so.
  virtual void begin_last_backward(const std::vector<size_t>& params) { (void)params; }
  // After the last micro-batch: the data-parallel reduction (nothing on one process), or what is
  // left of it and the wait for it.
  virtual void reduce_grads() = 0;
  // Global L2 norm of the reduced gradients, every parameter of the whole model counted once.
  virtual double grad_norm() = 0;
  // Scales every gradient by clip / (norm + 1e-6) when that is below 1 (Megatron, torch); clip <= 0
  // disables clipping.
  void clip_grads(double norm, double clip);
  // Multiplies every (reduced) gradient this rank holds by `factor`.
  virtual void scale_grads(double factor) = 0;
  // One AdamW update at learning rate `lr`, then zeroes the gradients.
  virtual void step(double lr) = 0;
  // Drops the accumulated gradients without an update (a skipped iteration).
  virtual void zero_grads() = 0;

  virtual int64_t steps() const = 0;
  virtual const std::vector<TrainableParameter>& params() const = 0;
  int64_t num_trainable_elements() const;

  // Optimizer state for checkpoints, per parameter and shaped like this rank's parameters:
  // exp_avg.<name>, exp_avg_sq.<name> and, in bf16, master.<name>. Collective for a sharded
  // optimizer (every rank of its groups must call it).
  virtual NamedTensors state() = 0;
  // Restores state(); throws UserError naming `source` and every missing or mis-shaped tensor.
  virtual void load_state(const StateLookup& lookup, const std::string& source, int64_t steps) = 0;
};

// AdamW over whole parameters, every rank holding the full state. On one process reduce_grads()
// does nothing; DataParallelAdamW (parallel/) adds the data-parallel reduction and norm.
class AdamW : public Optimizer {
 public:
  AdamW(std::vector<TrainableParameter> params, const TrainingConfig& training);
  ~AdamW() override;  // detaches the fp32 main_grad buffers from the fused weight gradients
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  void accumulate_grads() override;
  void reduce_grads() override {}
  double grad_norm() override;
  void scale_grads(double factor) override;
  void step(double lr) override;
  void zero_grads() override;
  int64_t steps() const override { return steps_; }
  const std::vector<TrainableParameter>& params() const override { return params_; }
  NamedTensors state() override;
  void load_state(const StateLookup& lookup, const std::string& source, int64_t steps) override;

 protected:
  torch::Tensor& grad(size_t i);  // the fp32 gradient of parameter i (zeros where it got none)
  void accumulate_grad(size_t i);  // accumulate_grads() for parameter i
  // A fused weight gradient (kernels/wgrad_accumulation.h) was just added into parameter i's
  // main_grad, during a backward.
  virtual void grad_added(size_t /*i*/) {}
  // Squared L2 norms of this rank's gradients.
  GradSquares grad_sq_norms();

 private:
  std::vector<TrainableParameter> params_;
  std::vector<torch::Tensor> master_, main_grad_, exp_avg_, exp_avg_sq_;  // master/main_grad: bf16 only
  TrainingConfig hyper_;
  int64_t steps_ = 0;
};

// Throws the UserError load_state() reports for `problems` (does nothing when empty).
void report_state_problems(const std::string& source, const std::vector<std::string>& problems);

}  // namespace moeforge
