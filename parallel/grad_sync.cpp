#include "parallel/grad_sync.h"

namespace moeforge {

void all_reduce_in_buckets(std::vector<torch::Tensor>& tensors, Communicator& group, ReduceOp op, int64_t bucket_bytes) {
  if (group.size() == 1) return;
  torch::NoGradGuard no_grad;
  size_t begin = 0;
  while (begin < tensors.size()) {
    // One bucket: consecutive tensors of one dtype up to bucket_bytes (at least one tensor).
    size_t end = begin;
    int64_t bytes = 0;
    while (end < tensors.size() && tensors[end].scalar_type() == tensors[begin].scalar_type() &&
           (end == begin || bytes + tensors[end].nbytes() <= static_cast<size_t>(bucket_bytes))) {
      bytes += static_cast<int64_t>(tensors[end].nbytes());
      ++end;
    }
    std::vector<torch::Tensor> flat;
    for (size_t i = begin; i < end; ++i) flat.push_back(tensors[i].reshape({-1}));
    auto bucket = torch::cat(flat);
    group.all_reduce(bucket, op);
    int64_t at = 0;
    for (size_t i = begin; i < end; ++i) {
      const int64_t n = tensors[i].numel();
      tensors[i].copy_(bucket.narrow(0, at, n).view(tensors[i].sizes()));
      at += n;
    }
    begin = end;
  }
}

}  // namespace moeforge
