// defines: DataParallelAdamW, DistributedAdamW, make_optimizer
//
// The two data-parallel optimizers (parallel.use_distributed_optimizer picks one):
//
// DataParallelAdamW: every rank holds the whole fp32 state (as Megatron without
//   --use-distributed-optimizer). Replicated gradients are averaged over DP in buckets; expert
//   gradients (each EP rank holds other experts) are summed over the expert-data-parallel group
//   and divided by DP, which is the same average over every token of the global batch. With
//   parallel.overlap_comm the buckets (in reverse model order, parallel.ddp_bucket_size elements)
//   start reducing during the last micro-batch's backward, as their gradients become final
//   (post-accumulate-grad hooks), on the groups' communication threads; reduce_grads() waits.
//   Bit-identical to overlap off (the same buckets, the same reductions).
//
// DistributedAdamW (ZeRO-1, Megatron's distributed optimizer): the trainable parameters are laid
//   out in flat fp32 buckets, replicated ones over DP and expert ones over EDP, each in reverse
//   model order in buckets of at most parallel.ddp_bucket_size elements, padded to a multiple of
//   its group's size. Micro-batch gradients accumulate into the buckets; each bucket is
//   reduce-scattered, so each rank keeps the summed gradient of its 1/G shard only; the fp32 master
//   weights and Adam moments exist only for that shard; after the update the shards are
//   all-gathered into the model's weights. Optimizer memory per rank drops from 12 to 12/G bytes
//   per parameter (plus the 4-byte buffer). With parallel.overlap_comm a bucket's reduce-scatter
//   starts during the last micro-batch's backward as soon as its gradients are final (as above),
//   and each bucket's parameter all-gather starts as soon as its update is done, overlapping the
//   next buckets' updates. Bit-identical to overlap off.
//
// Under sequence parallelism both then sum the gradients of the parameters fed one chunk of the
// sequence per TP rank (TrainableParameter::sequence_parallel) over the TP group.
//
// Both count every parameter of the model once in the gradient norm and do the same elementwise
// AdamW math (kernels::adamw_step, whose elements do not depend on where a tensor is cut), so
// their updates are identical. In bf16 the update also writes the shard's bf16 copy, and that is
// what the all-gather sends. Checkpoints hold per-parameter state
// (state() gathers the shards, in host memory), so a checkpoint does not depend on the layout it
// was saved from.
#pragma once

#include "core/optim/optimizer.h"
#include "parallel/grad_sync.h"
#include "parallel/comm/process_groups.h"

#include <memory>
#include <tuple>
#include <vector>

namespace moeforge {

class DataParallelAdamW : public AdamW {
 public:
  // parallel.overlap_comm and parallel.ddp_bucket_size from `parallel`.
  DataParallelAdamW(std::vector<TrainableParameter> params, const TrainingConfig& training, const ProcessGroups& groups,
                    const ParallelConfig& parallel);
  ~DataParallelAdamW() override;  // removes the gradient hooks
  DataParallelAdamW(const DataParallelAdamW&) = delete;
  DataParallelAdamW& operator=(const DataParallelAdamW&) = delete;
  void begin_last_backward(const std::vector<size_t>& params) override;
  void reduce_grads() override;
  double grad_norm() override;

 private:
  // A post-accumulate-grad hook or a fused weight gradient during the last backward: the gradient
  // of parameter i is final (once; see LastBackward).
  void grad_final(size_t i);
  void grad_added(size_t i) override { grad_final(i); }

  ProcessGroups groups_;
  bool overlap_ = false;
  LastBackward last_;  // which gradients are final in their last backward
  // Backward order (reverse model order) of the replicated and the expert parameters, their
  // buckets (over DP, and over EDP), and each parameter's place: {expert?, position}.
  std::vector<size_t> replicated_, expert_;
  std::vector<std::pair<bool, size_t>> place_;
  std::unique_ptr<GradBuckets> replicated_buckets_, expert_buckets_;
};

class DistributedAdamW : public Optimizer {
 public:
  DistributedAdamW(std::vector<TrainableParameter> params, const TrainingConfig& training, const ProcessGroups& groups,
                   const ParallelConfig& parallel);
  ~DistributedAdamW() override;  // removes the gradient hooks and the main_grad attachments
  DistributedAdamW(const DistributedAdamW&) = delete;
  DistributedAdamW& operator=(const DistributedAdamW&) = delete;

  void begin_last_backward(const std::vector<size_t>& params) override;
  void accumulate_grads() override;
  void reduce_grads() override;
  double grad_norm() override;
  void scale_grads(double factor) override;
  void step(double lr) override;
  void zero_grads() override;
  int64_t steps() const override { return steps_; }
  const std::vector<TrainableParameter>& params() const override { return params_; }
  NamedTensors state() override;
  void load_state(const StateLookup& lookup, const std::string& source, int64_t steps) override;

 private:
  // One flat buffer and this rank's shard of it.
  struct Bucket {
    std::shared_ptr<Communicator> group;  // dp (replicated parameters) or edp (experts)
    std::vector<size_t> members;          // indices into params_, in backward order
    std::vector<int64_t> offsets;         // of each member in the flat buffer
    int64_t padded = 0, shard = 0;        // flat size (a multiple of the group size), shard size
    // The shard's runs of members with and without weight decay: {begin, length, decay}.
    std::vector<std::tuple<int64_t, int64_t, bool>> runs;
    // The shard's runs that this rank adds to the gradient norm: {begin, length} (see grad_norm).
    std::vector<std::pair<int64_t, int64_t>> norm_runs;
    // The shard's runs of sequence-parallel members, summed over TP after the reduction.
    std::vector<std::pair<int64_t, int64_t>> sequence_parallel_runs;
    torch::Tensor main_grad;  // [padded] fp32: micro-batch gradients accumulate here
    torch::Tensor grad_shard, master, exp_avg, exp_avg_sq;  // [shard] fp32
    torch::Tensor model_shard;  // [shard] bf16 for a bf16 model (the all-gather's input), else undefined
    torch::Tensor gathered;     // [padded] while the all-gather of the update is in flight
  };
  // The parameters' values (or zeros) laid out flat, [padded] fp32.
  torch::Tensor flatten_params(const Bucket& b) const;
  // Parameter i's gradient into its bucket's main_grad (then dropped).
  void accumulate_grad(size_t i);
  // A post-accumulate-grad hook or a fused weight gradient (kernels/wgrad_accumulation.h) during
  // the last backward: the gradient of parameter i is final.
  void grad_final(size_t i);
  std::shared_ptr<Work> start_reduce(Bucket& b);
  std::shared_ptr<Work> start_gather(Bucket& b);
  void copy_gathered(Bucket& b);
  // Replicated buckets first, then expert buckets: each kind in backward order.
  std::vector<Bucket> buckets_;
  size_t expert_begin_ = 0;  // the first expert bucket
  // Where each parameter is: its bucket, its position in its kind's backward order, its member index.
  struct Place {
    size_t bucket = 0, order = 0, member = 0;
  };
  std::vector<Place> place_;
  std::unique_ptr<BucketSchedule> replicated_schedule_, expert_schedule_;

  std::vector<TrainableParameter> params_;
  ProcessGroups groups_;
  TrainingConfig hyper_;
  bool overlap_ = false;
  LastBackward last_;  // which gradients are final in their last backward
  bool mixed_ = false;  // bf16 parameters: master weights are part of the saved state
  int64_t steps_ = 0;
};

// DistributedAdamW with parallel.use_distributed_optimizer, else DataParallelAdamW (which is plain
// AdamW on one process).
std::unique_ptr<Optimizer> make_optimizer(std::vector<TrainableParameter> params, const TrainingConfig& training,
                                          const ProcessGroups& groups, const ParallelConfig& parallel);

}  // namespace moeforge
