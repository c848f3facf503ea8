#include "moe/dispatcher.h"

namespace moeforge::moe {

Dispatched LocalDispatcher::dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK) {
  return sort_by_expert(x_TD, experts_TK, num_experts_);
}

torch::Tensor LocalDispatcher::combine(const torch::Tensor& y_ND, const Dispatched& d) { return unsort(y_ND, d); }

Dispatched sort_by_expert(const torch::Tensor& x_TD, const torch::Tensor& experts_TK, int64_t num_experts) {
  const int64_t K = experts_TK.size(1);
  const auto experts_S = experts_TK.reshape({-1});
  const auto order_S = std::get<1>(torch::sort(experts_S, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  Dispatched d;
  // Block sizes are needed on the host to slice per expert (a device-to-host sync on GPUs, as in
  // Megatron). Dropped slots (expert id num_experts) sort last and are not sent.
  const auto counts = torch::bincount(experts_S, /*weights=*/{}, num_experts + 1).to(torch::kCPU);
  d.rows_per_local_expert.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + num_experts);
  d.dropped = counts.data_ptr<int64_t>()[num_experts];
  const auto kept_S = order_S.narrow(0, 0, order_S.size(0) - d.dropped);
  d.x_ND = x_TD.index_select(0, torch::div(kept_S, K, "floor"));
  d.inverse_S = torch::empty_like(order_S);
  d.inverse_S.index_put_({order_S}, torch::arange(order_S.size(0), order_S.options()));
  return d;
}

torch::Tensor unsort(const torch::Tensor& y_ND, const Dispatched& d) {
  if (d.dropped == 0) return y_ND.index_select(0, d.inverse_S);
  return torch::cat({y_ND, torch::zeros({d.dropped, y_ND.size(1)}, y_ND.options())}).index_select(0, d.inverse_S);
}

}  // namespace moeforge::moe
