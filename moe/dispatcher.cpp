#include "moe/dispatcher.h"

#include "core/device/host_sync.h"
#include "core/kernels/moe_permute.h"
#include "moe/router.h"

namespace moeforge::moe {

Dispatched LocalDispatcher::dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK, const Overlapped& overlapped) {
  Dispatched d = sort_by_expert(x_TD, experts_TK, num_experts_);
  if (overlapped) overlapped();
  return d;
}

torch::Tensor LocalDispatcher::combine(const torch::Tensor& y_ND, const Dispatched& d, const torch::Tensor& weights_TK,
                                       const Overlapped& overlapped) {
  if (overlapped) overlapped();
  return weighted_unsort(y_ND, d, weights_TK);
}

Dispatched sort_by_expert(const torch::Tensor& x_TD, const torch::Tensor& experts_TK, int64_t num_experts) {
  const int64_t K = experts_TK.size(1);
  const auto experts_A = experts_TK.reshape({-1});
  const auto order_A = std::get<1>(torch::sort(experts_A, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  Dispatched d;
  // Block sizes are needed on the host to slice per expert and size the all-to-all: the layer's one
  // device-to-host sync, as in Megatron. Dropped slots (expert id num_experts) sort last, not sent.
  const auto counts = to_host(slots_per_expert(experts_A, num_experts + 1));
  d.rows_per_local_expert.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + num_experts);
  d.dropped = counts.data_ptr<int64_t>()[num_experts];
  const int64_t N = order_A.size(0) - d.dropped;
  d.slot_of_row_N = order_A.narrow(0, 0, N).contiguous();
  // Each slot's sorted row: a permutation written once per row (deterministic), -1 where dropped.
  d.row_of_slot_A = torch::full_like(order_A, -1).index_put_({d.slot_of_row_N}, torch::arange(N, order_A.options()));
  d.x_ND = kernels::moe_permute(x_TD, d.slot_of_row_N, d.row_of_slot_A, K);
  return d;
}

torch::Tensor weighted_unsort(const torch::Tensor& y_ND, const Dispatched& d, const torch::Tensor& weights_TK) {
  return kernels::moe_combine(y_ND, d.slot_of_row_N, d.row_of_slot_A, weights_TK);
}

}  // namespace moeforge::moe
