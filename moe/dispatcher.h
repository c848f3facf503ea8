// defines: Dispatcher, Dispatched, LocalDispatcher
//
// Moves token-expert slots to the experts that process them and the results back. The MoE layer
// only calls this interface: LocalDispatcher keeps everything on this rank; the expert-parallel
// all-to-all dispatcher implements the same two calls. Shapes: T tokens, K top-k, S = T * K
// slots, N rows for the local experts, D hidden.
#pragma once

#include <torch/torch.h>

#include <vector>

namespace moeforge::moe {

struct Dispatched {
  torch::Tensor x_ND;                          // rows for the local experts, grouped by expert
  std::vector<int64_t> rows_per_local_expert;  // block sizes of x_ND, in local-expert order
  torch::Tensor inverse_S;                     // what combine() needs to restore slot order
  int64_t dropped = 0;                         // slots dropped by a capacity limit
  // Expert parallel only (AllToAllDispatcher): rows sent to / received from each EP rank, and the
  // permutation from arrival order (by source rank) to local-expert order.
  std::vector<int64_t> send_rows, recv_rows;
  torch::Tensor regroup_N;
};

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  // experts_TK holds each slot's expert, or num_experts for a slot dropped by the capacity limit.
  virtual Dispatched dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK) = 0;
  // The expert outputs back in slot order (token-major: slot t * K + k), [S, D]; dropped slots
  // get zeros.
  virtual torch::Tensor combine(const torch::Tensor& y_ND, const Dispatched& dispatched) = 0;
};

// The slots' rows sorted stably by expert (x_ND, one block per expert of `num_experts`, dropped
// slots left out), with the inverse permutation and counts: LocalDispatcher's whole dispatch, and
// the first step of the expert-parallel one.
Dispatched sort_by_expert(const torch::Tensor& x_TD, const torch::Tensor& experts_TK, int64_t num_experts);
// Rows in sorted-slot order (dropped slots excluded) back to slot order, zeros for dropped slots.
torch::Tensor unsort(const torch::Tensor& y_ND, const Dispatched& sorted);

// All experts on this rank: a stable sort of the slots by expert, one gather, and the inverse
// permutation to come back (a gather too: deterministic, no scatter-add).
class LocalDispatcher : public Dispatcher {
 public:
  explicit LocalDispatcher(int64_t num_experts) : num_experts_(num_experts) {}
  Dispatched dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK) override;
  torch::Tensor combine(const torch::Tensor& y_ND, const Dispatched& dispatched) override;

 private:
  int64_t num_experts_;
};

}  // namespace moeforge::moe
