#include "moe/dispatcher.h"

namespace moeforge::moe {

Dispatched LocalDispatcher::dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK) {
  const int64_t K = experts_TK.size(1);
  const auto experts_S = experts_TK.reshape({-1});
  const auto order_S = std::get<1>(torch::sort(experts_S, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  Dispatched d;
  d.x_ND = x_TD.index_select(0, torch::div(order_S, K, "floor"));
  // Block sizes are needed on the host to slice per expert (a device-to-host sync on GPUs, as in
  // Megatron).
  const auto counts_E = torch::bincount(experts_S, /*weights=*/{}, num_experts_).to(torch::kCPU);
  d.rows_per_local_expert.assign(counts_E.data_ptr<int64_t>(), counts_E.data_ptr<int64_t>() + num_experts_);
  d.inverse_S = torch::empty_like(order_S);
  d.inverse_S.index_put_({order_S}, torch::arange(order_S.size(0), order_S.options()));
  return d;
}

torch::Tensor LocalDispatcher::combine(const torch::Tensor& y_ND, const Dispatched& d) {
  return y_ND.index_select(0, d.inverse_S);
}

}  // namespace moeforge::moe
