// defines: all_reduce_in_buckets
//
// Data-parallel gradient averaging: gradients are packed into flat buckets of about `bucket_bytes`
// (fewer, larger messages, as Megatron's DDP buckets), all-reduced (average) over the group and
// unpacked in place. Blocking (the Communicator contract).
#pragma once

#include "parallel/communicator.h"

#include <torch/torch.h>

#include <vector>

namespace moeforge {

void all_reduce_in_buckets(std::vector<torch::Tensor>& tensors, Communicator& group, ReduceOp op,
                           int64_t bucket_bytes = 40LL << 20);

}  // namespace moeforge
