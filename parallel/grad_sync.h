// defines: default_bucket_elements, bucket_ranges, BucketSchedule, GradBuckets, LastBackward,
//          all_reduce_packed
//
// Data-parallel gradient reduction in flat buckets (fewer, larger messages, as Megatron's DDP).
// Buckets are laid out once, over the gradients in the order the backward finishes them (the
// caller passes them in reverse model order), at most `bucket_elements` elements each (a tensor
// larger than that is a bucket of its own). Either way of reducing uses the same buckets and the
// same reduction, so the results are bit-identical:
//   - overlapped (parallel.overlap_comm): ready(k) as each gradient becomes final during the
//     backward; a bucket whose gradients are all final starts its asynchronous reduction, buckets
//     always in layout order (every rank starts them in the same order, whatever order its backward
//     finished them in); finish() starts what is left and waits;
//   - blocking: finish() alone.
// BucketSchedule is that order, whatever a bucket's reduction is: GradBuckets all-reduces packed
// copies of the gradients (DataParallelAdamW); DistributedAdamW reduce-scatters its flat buffers.
#pragma once

#include "parallel/comm/communicator.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace moeforge {

// Megatron's default --ddp-bucket-size: max(40M, 1M x DP) elements.
int64_t default_bucket_elements(int64_t dp);

// The buckets of gradients of `numels` (in backward order): [begin, end) ranges of consecutive
// gradients of at most `bucket_elements` elements, or one gradient larger than that.
std::vector<std::pair<size_t, size_t>> bucket_ranges(const std::vector<int64_t>& numels, int64_t bucket_elements);

class BucketSchedule {
 public:
  // Starts bucket b's reduction and returns its handle.
  using Start = std::function<std::shared_ptr<Work>(size_t b)>;

  BucketSchedule(const std::vector<std::pair<size_t, size_t>>& ranges, Start start);

  // Gradient k is final (at most once per k between finish() calls).
  void ready(size_t k);
  // Starts every bucket not started yet, in order, waits for all and resets for the next step.
  void finish();

 private:
  Start start_;
  std::vector<size_t> size_, pending_;  // per bucket: gradients, not yet ready
  std::vector<size_t> bucket_of_;       // gradient -> bucket
  std::vector<char> is_ready_;          // gradient -> ready() called since the last finish()
  std::vector<std::shared_ptr<Work>> work_;
  size_t next_ = 0;  // the first bucket not started
};

class GradBuckets {
 public:
  // Gradient k (in backward order), read when its bucket starts and written back by finish().
  using GradOf = std::function<torch::Tensor(size_t k)>;

  // `numels`: the gradients' sizes, in backward order; reduced over `group` with `op`, through
  // all_reduce_async when `overlap` (else blocking calls).
  GradBuckets(const std::vector<int64_t>& numels, std::shared_ptr<Communicator> group, ReduceOp op, int64_t bucket_elements,
              bool overlap, GradOf grad_of);

  void ready(size_t k) {
    if (group_->size() > 1) schedule_.ready(k);
  }
  // Starts every bucket not started yet, waits for all and writes the reduced values back.
  void finish();

  size_t num_buckets() const { return ranges_.size(); }

 private:
  std::shared_ptr<Work> start(size_t b);

  std::shared_ptr<Communicator> group_;
  ReduceOp op_;
  bool overlap_;
  GradOf grad_of_;
  std::vector<std::pair<size_t, size_t>> ranges_;
  std::vector<torch::Tensor> flat_;  // per bucket, while started
  BucketSchedule schedule_;
};

// Which parameters are in their last backward of the step, and which of those have their final
// gradient already. With interleaved pipeline stages each model chunk's last backward comes at its
// own time, so parameters are armed chunk by chunk. A fused weight gradient reports its gradient
// after adding into main_grad, and LibTorch 2.15 runs the weight's post-accumulate-grad hook as
// well (AccumulateGrad calls it even for the undefined gradient the fused op returns): the first
// of the two counts.
// Sums `tensors` (views of one dtype, any shapes) over `group` in one message: packed into a flat
// buffer, all-reduced, copied back. Blocking; nothing to do on a group of one.
void all_reduce_packed(const std::vector<torch::Tensor>& tensors, Communicator& group);

class LastBackward {
 public:
  explicit LastBackward(size_t params = 0) : state_(params, kIdle) {}
  void arm(const std::vector<size_t>& params) {
    for (size_t i : params) state_.at(i) = kArmed;
  }
  // Parameter i's gradient is final: true the first time in its armed backward.
  bool take(size_t i) {
    if (state_[i] != kArmed) return false;
    state_[i] = kFinal;
    return true;
  }
  void reset() { std::fill(state_.begin(), state_.end(), kIdle); }

 private:
  enum : char { kIdle, kArmed, kFinal };
  std::vector<char> state_;
};

}  // namespace moeforge
