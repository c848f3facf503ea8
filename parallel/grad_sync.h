// defines: GradBuckets, default_bucket_elements
//
// Data-parallel gradient reduction in flat buckets (fewer, larger messages, as Megatron's DDP).
// Buckets are laid out once, over the gradients in the order the backward finishes them (the
// caller passes them in reverse model order), at most `bucket_elements` elements each (a tensor
// larger than that is a bucket of its own). Either way of reducing uses the same buckets and the
// same reduction, so the results are bit-identical:
//   - overlapped (parallel.overlap_comm): ready(k) as each gradient becomes final during the
//     backward; a bucket whose gradients are all final starts its asynchronous all-reduce, buckets
//     always in layout order (every rank starts them in the same order, whatever order its backward
//     finished them in); finish() starts what is left, waits and unpacks;
//   - blocking: finish() alone.
#pragma once

#include "parallel/communicator.h"

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace moeforge {

// Megatron's default --ddp-bucket-size: max(40M, 1M x DP) elements.
int64_t default_bucket_elements(int64_t dp);

class GradBuckets {
 public:
  // Gradient k (in backward order), read when its bucket starts and written back by finish().
  using GradOf = std::function<torch::Tensor(size_t k)>;

  // `numels`: the gradients' sizes, in backward order; reduced over `group` with `op`, through
  // all_reduce_async when `overlap` (else blocking calls).
  GradBuckets(const std::vector<int64_t>& numels, std::shared_ptr<Communicator> group, ReduceOp op, int64_t bucket_elements,
              bool overlap);

  // Gradient k is final (overlapped mode; at most once per k between finish() calls).
  void ready(size_t k, const GradOf& grad_of);
  // Starts every bucket not started yet, waits for all and writes the reduced values back.
  void finish(const GradOf& grad_of);

  size_t num_buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    size_t begin = 0, end = 0;  // gradients [begin, end)
    size_t pending = 0;         // not yet ready
    torch::Tensor flat;         // while started
    std::shared_ptr<Work> work;
  };
  void start(Bucket& b, const GradOf& grad_of);

  std::shared_ptr<Communicator> group_;
  ReduceOp op_;
  bool overlap_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;  // gradient -> bucket
  std::vector<char> is_ready_;     // gradient -> ready() called since the last finish()
  size_t next_ = 0;                // the first bucket not started
};

}  // namespace moeforge
