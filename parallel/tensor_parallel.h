// defines: TensorParallelCut, tensor_parallel_part, tensor_parallel_join, enter_tensor_parallel,
//          leave_tensor_parallel, gather_sequence_parallel, scatter_sequence_parallel,
//          sequence_parallel_whole
//
// Megatron's tensor parallelism: a column-parallel projection
// (q/k/v, gate/up, an expert's gate_up) keeps a contiguous block of its output rows, the
// row-parallel one after it (o_proj, down) the matching block of its input columns, so the pair's
// partial outputs add up to the whole block's. Two autograd functions mark the region
// (model::SplitRegion): `enter` (Megatron's copy_to_tensor_model_parallel_region) passes a whole
// tensor forward and sums its gradient over the TP ranks; `leave`
// (reduce_from_tensor_model_parallel_region) sums the partial outputs and passes the gradient back
// as it is. Both run on the caller's thread and stream (blocking all-reduces over the TP group).
//
// Sequence parallelism (Megatron's --sequence-parallel) keeps 1/TP of the sequence (dim 1 of a
// [B, S, D] activation) on each TP rank outside the regions. `gather` (Megatron's
// gather_from_sequence_parallel_region) enters a region: the whole sequence all-gathered forward,
// the gradient reduce-scattered back; `scatter` (reduce_scatter_to_sequence_parallel_region)
// leaves it: the partial outputs reduce-scattered, each rank its chunk of the sum, the gradient
// all-gathered back. The same communication volume as the two all-reduces, with 1/TP of the
// activations outside the regions. `sequence_parallel_whole` is what the whole weights inside a
// region (an MoE router) see: the gathered sequence, whose gradient goes to this rank's chunk
// only, because every rank computes the same whole gradient there.
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include "parallel/comm/communicator.h"

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

// x_BsD (this rank's chunk, s = S / TP) -> x_BSD, and y_BSD (partial) -> this rank's chunk of the sum.
torch::Tensor gather_sequence_parallel(const torch::Tensor& x_BsD, const std::shared_ptr<Communicator>& tp);
torch::Tensor scatter_sequence_parallel(const torch::Tensor& y_BSD, const std::shared_ptr<Communicator>& tp);
// gathered_BSD = gather_sequence_parallel(x_BsD) as a tensor whose gradient reaches x_BsD's own
// chunk only (no communication, no copy: a view of the gathered values).
torch::Tensor sequence_parallel_whole(const torch::Tensor& x_BsD, const torch::Tensor& gathered_BSD, int64_t rank,
                                      int64_t size);

}  // namespace moeforge
