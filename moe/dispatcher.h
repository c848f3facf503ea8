// defines: Dispatcher, Dispatched, LocalDispatcher
//
// Moves token-expert slots to the experts that process them and the results back. The MoE layer
// only calls this interface: LocalDispatcher keeps everything on this rank; the expert-parallel
// all-to-all dispatcher implements the same two calls. Shapes (Note [shape suffixes],
// core/base/shapes.h): T tokens, K top-k, A = T * K slots, N rows for the local experts, D hidden.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

namespace moeforge::moe {

struct Dispatched {
  torch::Tensor x_ND;                          // rows for the local experts, grouped by expert
  std::vector<int64_t> rows_per_local_expert;  // block sizes of x_ND, in local-expert order
  // This rank's slots after the stable sort by expert (kernels/moe_permute.h): the slot of each
  // sorted row, and the sorted row of each slot (-1 for a dropped one); int64 on the device.
  torch::Tensor slot_of_row_N, row_of_slot_A;
  int64_t dropped = 0;  // slots dropped by a capacity limit
  // Expert parallel only (AllToAllDispatcher): rows sent to / received from each EP rank, and the
  // permutation from arrival order (by source rank) to local-expert order and back.
  std::vector<int64_t> send_rows, recv_rows;
  torch::Tensor regroup_N, ungroup_N;
};

// Work the caller gives a dispatcher to run while its exchange is in flight, forward and backward
// (the shared expert: Megatron's --moe-shared-expert-overlap). A dispatcher without communication
// runs it where the exchange would be, so the autograd graph has the same shape either way.
using Overlapped = std::function<void()>;

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  // experts_TK holds each slot's expert, or num_experts for a slot dropped by the capacity limit.
  // Runs `overlapped` (if set) once, during the exchange.
  virtual Dispatched dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK,
                              const Overlapped& overlapped = {}) = 0;
  // The expert outputs back to their tokens, each token's K slots weighted by weights_TK and
  // summed: [T, D]; dropped slots add nothing. Runs `overlapped` (if set) once, during the exchange.
  virtual torch::Tensor combine(const torch::Tensor& y_ND, const Dispatched& dispatched, const torch::Tensor& weights_TK,
                                const Overlapped& overlapped = {}) = 0;
};

// The slots' rows sorted stably by expert (x_ND, one block per expert of `num_experts`, dropped
// slots left out), with both index maps and the counts: LocalDispatcher's whole dispatch, and the
// first step of the expert-parallel one.
Dispatched sort_by_expert(const torch::Tensor& x_TD, const torch::Tensor& experts_TK, int64_t num_experts);
// Rows in this rank's sorted-slot order back to their tokens, weighted and summed (combine's last step).
torch::Tensor weighted_unsort(const torch::Tensor& y_ND, const Dispatched& sorted, const torch::Tensor& weights_TK);

// All experts on this rank: a stable sort of the slots by expert, one gather (kernels::moe_permute),
// and the weighted gather back (kernels::moe_combine): deterministic, no scatter-add.
class LocalDispatcher : public Dispatcher {
 public:
  explicit LocalDispatcher(int64_t num_experts) : num_experts_(num_experts) {}
  Dispatched dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK, const Overlapped& overlapped = {}) override;
  torch::Tensor combine(const torch::Tensor& y_ND, const Dispatched& dispatched, const torch::Tensor& weights_TK,
                        const Overlapped& overlapped = {}) override;

 private:
  int64_t num_experts_;
};

}  // namespace moeforge::moe
