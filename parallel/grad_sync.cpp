#include "parallel/grad_sync.h"

#include <algorithm>
#include <stdexcept>

namespace moeforge {

int64_t default_bucket_elements(int64_t dp) { return std::max<int64_t>(40'000'000, 1'000'000 * dp); }

std::vector<std::pair<size_t, size_t>> bucket_ranges(const std::vector<int64_t>& numels, int64_t bucket_elements) {
  std::vector<std::pair<size_t, size_t>> ranges;
  size_t begin = 0;
  while (begin < numels.size()) {
    size_t end = begin;
    int64_t elements = 0;
    while (end < numels.size() && (end == begin || elements + numels[end] <= bucket_elements)) elements += numels[end++];
    ranges.emplace_back(begin, end);
    begin = end;
  }
  return ranges;
}

BucketSchedule::BucketSchedule(const std::vector<std::pair<size_t, size_t>>& ranges, Start start)
    : start_(std::move(start)), work_(ranges.size()) {
  for (size_t b = 0; b < ranges.size(); ++b) {
    size_.push_back(ranges[b].second - ranges[b].first);
    for (size_t k = ranges[b].first; k < ranges[b].second; ++k) bucket_of_.push_back(b);
  }
  pending_ = size_;
  is_ready_.assign(bucket_of_.size(), 0);
}

void BucketSchedule::ready(size_t k) {
  // A second accumulation after its bucket may have been sent would be lost.
  if (is_ready_[k]) throw std::logic_error("BucketSchedule: a gradient became final twice in one backward");
  is_ready_[k] = 1;
  --pending_[bucket_of_[k]];
  while (next_ < work_.size() && pending_[next_] == 0) {
    work_[next_] = start_(next_);
    ++next_;
  }
}

void BucketSchedule::finish() {
  while (next_ < work_.size()) {
    work_[next_] = start_(next_);
    ++next_;
  }
  for (auto& w : work_) {
    w->wait();
    w = nullptr;
  }
  pending_ = size_;
  std::fill(is_ready_.begin(), is_ready_.end(), 0);
  next_ = 0;
}

GradBuckets::GradBuckets(const std::vector<int64_t>& numels, std::shared_ptr<Communicator> group, ReduceOp op,
                         int64_t bucket_elements, bool overlap, GradOf grad_of)
    : group_(std::move(group)),
      op_(op),
      overlap_(overlap),
      grad_of_(std::move(grad_of)),
      ranges_(bucket_ranges(numels, bucket_elements)),
      flat_(ranges_.size()),
      schedule_(ranges_, [this](size_t b) { return start(b); }) {}

std::shared_ptr<Work> GradBuckets::start(size_t b) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  for (size_t k = ranges_[b].first; k < ranges_[b].second; ++k) parts.push_back(grad_of_(k).reshape({-1}));
  flat_[b] = torch::cat(parts);
  if (overlap_) return group_->all_reduce_async(flat_[b], op_);
  group_->all_reduce(flat_[b], op_);
  return completed_work();
}

void GradBuckets::finish() {
  if (group_->size() == 1) return;
  torch::NoGradGuard no_grad;
  schedule_.finish();
  for (size_t b = 0; b < ranges_.size(); ++b) {
    int64_t at = 0;
    for (size_t k = ranges_[b].first; k < ranges_[b].second; ++k) {
      auto g = grad_of_(k);
      g.copy_(flat_[b].narrow(0, at, g.numel()).view(g.sizes()));
      at += g.numel();
    }
    flat_[b] = torch::Tensor();
  }
}

void all_reduce_packed(const std::vector<torch::Tensor>& tensors, Communicator& group) {
  if (group.size() == 1 || tensors.empty()) return;
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  for (const auto& t : tensors) parts.push_back(t.reshape({-1}));
  auto flat = torch::cat(parts);
  group.all_reduce(flat, ReduceOp::sum);
  int64_t at = 0;
  for (const auto& t : tensors) {
    t.copy_(flat.narrow(0, at, t.numel()).view(t.sizes()));
    at += t.numel();
  }
}

}  // namespace moeforge
