// defines: TensorParallelCut, tensor_parallel_part, tensor_parallel_join, enter_tensor_parallel,
//          leave_tensor_parallel
//
// Megatron's tensor parallelism, without sequence parallelism: a column-parallel projection
// (q/k/v, gate/up, an expert's gate_up) keeps a contiguous block of its output rows, the
// row-parallel one after it (o_proj, down) the matching block of its input columns, so the pair's
// partial outputs add up to the whole block's. Two autograd functions mark the region
// (model::SplitRegion): `enter` (Megatron's copy_to_tensor_model_parallel_region) passes a whole
// tensor forward and sums its gradient over the TP ranks; `leave`
// (reduce_from_tensor_model_parallel_region) sums the partial outputs and passes the gradient back
// as it is. Both run on the caller's thread and stream (blocking all-reduces over the TP group).
#pragma once

#include "parallel/communicator.h"

#include <torch/torch.h>

#include <memory>
#include <vector>

namespace moeforge {

// How tensor parallelism cuts a parameter: not at all (dim < 0), or dimension `dim` into TP equal
// blocks; with `halves` (the experts' stacked gate/up rows) each half of `dim` is cut on its own,
// so a rank keeps matching gate and up rows.
struct TensorParallelCut {
  int64_t dim = -1;
  bool halves = false;
  bool splits() const { return dim >= 0; }
};

// TP rank `rank`'s part (of `size`) of `whole`, a view where the cut is one block.
torch::Tensor tensor_parallel_part(const torch::Tensor& whole, const TensorParallelCut& cut, int64_t rank, int64_t size);
// The whole tensor from every rank's part, in rank order: the inverse of tensor_parallel_part.
torch::Tensor tensor_parallel_join(const std::vector<torch::Tensor>& parts, const TensorParallelCut& cut);

torch::Tensor enter_tensor_parallel(const torch::Tensor& x, const std::shared_ptr<Communicator>& tp);
torch::Tensor leave_tensor_parallel(const torch::Tensor& y, const std::shared_ptr<Communicator>& tp);

}  // namespace moeforge
