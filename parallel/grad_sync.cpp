#include "parallel/grad_sync.h"

#include <algorithm>
#include <stdexcept>

namespace moeforge {

int64_t default_bucket_elements(int64_t dp) { return std::max<int64_t>(40'000'000, 1'000'000 * dp); }

GradBuckets::GradBuckets(const std::vector<int64_t>& numels, std::shared_ptr<Communicator> group, ReduceOp op,
                         int64_t bucket_elements, bool overlap)
    : group_(std::move(group)), op_(op), overlap_(overlap), bucket_of_(numels.size()), is_ready_(numels.size(), 0) {
  size_t begin = 0;
  while (begin < numels.size()) {
    size_t end = begin;
    int64_t elements = 0;
    while (end < numels.size() && (end == begin || elements + numels[end] <= bucket_elements)) elements += numels[end++];
    for (size_t k = begin; k < end; ++k) bucket_of_[k] = buckets_.size();
    buckets_.push_back({begin, end, end - begin, {}, {}});
    begin = end;
  }
}

void GradBuckets::start(Bucket& b, const GradOf& grad_of) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  for (size_t k = b.begin; k < b.end; ++k) parts.push_back(grad_of(k).reshape({-1}));
  b.flat = torch::cat(parts);
  if (overlap_) {
    b.work = group_->all_reduce_async(b.flat, op_);
  } else {
    group_->all_reduce(b.flat, op_);
    b.work = completed_work();
  }
}

void GradBuckets::ready(size_t k, const GradOf& grad_of) {
  if (group_->size() == 1) return;
  // A second accumulation after its bucket may have been sent would be lost.
  if (is_ready_[k]) throw std::logic_error("GradBuckets: a gradient became final twice in one backward");
  is_ready_[k] = 1;
  --buckets_[bucket_of_[k]].pending;
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) start(buckets_[next_++], grad_of);
}

void GradBuckets::finish(const GradOf& grad_of) {
  if (group_->size() > 1) {
    torch::NoGradGuard no_grad;
    while (next_ < buckets_.size()) start(buckets_[next_++], grad_of);
    for (auto& b : buckets_) {
      b.work->wait();
      int64_t at = 0;
      for (size_t k = b.begin; k < b.end; ++k) {
        auto g = grad_of(k);
        g.copy_(b.flat.narrow(0, at, g.numel()).view(g.sizes()));
        at += g.numel();
      }
      b.flat = torch::Tensor();
      b.work = nullptr;
    }
  }
  for (auto& b : buckets_) b.pending = b.end - b.begin;
  std::fill(is_ready_.begin(), is_ready_.end(), 0);
  next_ = 0;
}

}  // namespace moeforge
