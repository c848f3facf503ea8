#include "moe/router.h"

#include "core/kernels/wgrad_accumulation.h"
#include "core/model/transformer.h"

#include <cmath>
#include <tuple>

namespace moeforge::moe {

RouterImpl::RouterImpl(const ModelConfig& c)
    : topk_(c.moe_router_topk),
      pre_softmax_(c.moe_router_pre_softmax),
      norm_topk_(c.moe_router_norm_topk_prob),
      force_balance_(c.moe_router_force_load_balancing) {
  weight = model::deferred_parameter(*this, "weight", {*c.num_experts, c.hidden_size});
  if (c.moe_router_enable_expert_bias) {
    expert_bias = model::deferred_parameter(*this, "expert_bias", {*c.num_experts});
    expert_bias.set_requires_grad(false);
  }
}

void RouterImpl::to(torch::Dtype dtype, bool non_blocking) {
  torch::NoGradGuard no_grad;
  weight.set_data(weight.to(dtype, non_blocking));
}

void RouterImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::NoGradGuard no_grad;
  weight.set_data(weight.to(device, dtype, non_blocking));
  if (expert_bias.defined()) expert_bias.set_data(expert_bias.to(device, torch::kFloat32, non_blocking));
}

Routing RouterImpl::forward(const torch::Tensor& x_TD) {
  Routing r;
  r.logits_TE = kernels::linear(x_TD, weight);
  r.probs_TE = torch::softmax(r.logits_TE, -1, torch::kFloat32);
  // What the variant's top-k runs on, and takes its weights from.
  const torch::Tensor& scores_TE = pre_softmax_ ? r.probs_TE : r.logits_TE;
  torch::Tensor top_TK;
  if (force_balance_ || expert_bias.defined()) {
    r.experts_TK = force_balance_ ? forced_experts(x_TD.size(0), topk_, weight.size(0), x_TD.options())
                                  : std::get<1>(torch::topk(scores_TE.to(torch::kFloat32) + expert_bias, topk_, -1));
    top_TK = scores_TE.gather(1, r.experts_TK);  // unbiased
  } else {
    std::tie(top_TK, r.experts_TK) = torch::topk(scores_TE, topk_, -1);
  }
  if (pre_softmax_) {
    if (norm_topk_) top_TK = top_TK / top_TK.sum(-1, /*keepdim=*/true);
    r.weights_TK = top_TK.to(r.logits_TE.scalar_type());
  } else {
    r.weights_TK = torch::softmax(top_TK, -1, torch::kFloat32).to(r.logits_TE.scalar_type());
  }
  return r;
}

void update_expert_bias(torch::Tensor& bias_E, const torch::Tensor& load_E, double rate) {
  torch::NoGradGuard no_grad;
  // Loads are whole counts: exact in fp64, so every rank computes the same signs.
  const auto load = load_E.to(bias_E.device(), torch::kFloat64);
  const auto step_E = torch::sign(load.mean() - load).to(torch::kFloat32) * static_cast<float>(rate);
  bias_E.add_(step_E);
}

torch::Tensor forced_experts(int64_t T, int64_t K, int64_t E, const torch::TensorOptions& options) {
  return torch::arange(T * K, options.dtype(torch::kInt64)).remainder(E).view({T, K});
}

torch::Tensor slots_per_expert(const torch::Tensor& experts_TK, int64_t bins) {
  const auto experts_A = experts_TK.reshape({-1}).to(torch::kInt64);
  // Integer sums: exact in any order, so deterministic although the CUDA scatter uses atomics.
  return torch::zeros({bins}, experts_A.options()).scatter_add_(0, experts_A, torch::ones_like(experts_A));
}

namespace {
torch::Tensor counts_E(const torch::Tensor& experts_TK, int64_t num_experts) {
  return slots_per_expert(experts_TK, num_experts + 1).narrow(0, 0, num_experts).to(torch::kFloat32);
}
}  // namespace

torch::Tensor apply_capacity(const torch::Tensor& experts_TK, const torch::Tensor& weights_TK, int64_t num_experts,
                             double capacity_factor, TokenDropPolicy policy) {
  const int64_t T = experts_TK.size(0), K = experts_TK.size(1);
  const auto capacity = static_cast<int64_t>(
      std::ceil(static_cast<double>(T * K) / static_cast<double>(num_experts) * capacity_factor));
  const auto experts_A = experts_TK.reshape({-1});
  // Order the slots by expert and, within an expert, by priority; a slot's rank inside its
  // expert decides whether it fits.
  torch::Tensor order_A;
  if (policy == TokenDropPolicy::position) {
    order_A = std::get<1>(torch::sort(experts_A, /*stable=*/true, 0, false));
  } else {
    const auto by_prob_A = std::get<1>(torch::sort(weights_TK.reshape({-1}).to(torch::kFloat32), /*stable=*/true, 0, true));
    order_A = by_prob_A.index_select(0, std::get<1>(torch::sort(experts_A.index_select(0, by_prob_A), true, 0, false)));
  }
  const auto sorted_experts_A = experts_A.index_select(0, order_A);
  const auto counts = slots_per_expert(experts_A, num_experts);
  const auto starts = torch::cumsum(counts, 0) - counts;
  const auto rank_sorted_A = torch::arange(experts_A.size(0), experts_A.options()) - starts.index_select(0, sorted_experts_A);
  auto rank_A = torch::empty_like(rank_sorted_A);
  rank_A.index_put_({order_A}, rank_sorted_A);
  return torch::where(rank_A < capacity, experts_A, torch::full_like(experts_A, num_experts)).view({T, K});
}

torch::Tensor aux_loss(const torch::Tensor& probs_TE, const torch::Tensor& experts_TK, int64_t num_experts) {
  const double T = static_cast<double>(probs_TE.size(0));
  const double K = static_cast<double>(experts_TK.size(1));
  return (probs_TE.sum(0) * counts_E(experts_TK, num_experts)).sum() * (static_cast<double>(num_experts) / (K * T * T));
}

torch::Tensor global_aux_loss(const torch::Tensor& probs_TE, const torch::Tensor& load_E, double global_tokens,
                              int64_t topk) {
  const double T = static_cast<double>(probs_TE.size(0)), E = static_cast<double>(probs_TE.size(1));
  return (probs_TE.sum(0) * load_E.to(probs_TE.scalar_type())).sum() * (E / (static_cast<double>(topk) * T * global_tokens));
}

torch::Tensor seq_aux_loss(const torch::Tensor& probs_TE, const torch::Tensor& experts_TK, int64_t num_experts,
                           int64_t seq_length) {
  const int64_t sequences = probs_TE.size(0) / seq_length;
  auto total = torch::zeros({}, probs_TE.options());
  for (int64_t s = 0; s < sequences; ++s) {
    total = total + aux_loss(probs_TE.narrow(0, s * seq_length, seq_length), experts_TK.narrow(0, s * seq_length, seq_length),
                             num_experts);
  }
  return total / static_cast<double>(sequences);
}

torch::Tensor hf_pooled_aux_loss(const std::vector<torch::Tensor>& logits_TE_per_layer, int64_t num_experts, int64_t topk) {
  const auto options = logits_TE_per_layer.front().options().dtype(torch::kFloat32);
  auto slots_E = torch::zeros({num_experts}, options);
  auto probs_E = torch::zeros({num_experts}, options);
  double rows = 0;
  for (const auto& logits_TE : logits_TE_per_layer) {
    const auto probs_TE = torch::softmax(logits_TE, -1);
    const auto chosen_TK = std::get<1>(torch::topk(probs_TE, topk, -1));
    slots_E = slots_E + counts_E(chosen_TK, num_experts);
    probs_E = probs_E + probs_TE.to(torch::kFloat32).sum(0);
    rows += static_cast<double>(logits_TE.size(0));
  }
  return (slots_E / rows * (probs_E / rows)).sum() * static_cast<double>(num_experts);
}

torch::Tensor z_loss(const torch::Tensor& logits_TE) {
  return torch::logsumexp(logits_TE.to(torch::kFloat32), -1).pow(2).mean();
}

}  // namespace moeforge::moe
