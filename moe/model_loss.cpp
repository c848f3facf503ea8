#include "moe/model_loss.h"

#include "moe/router.h"

namespace moeforge::moe {

LossBreakdown model_loss(const ModelConfig& c, const model::ModelOutput& out, const torch::Tensor& labels_BS,
                         const torch::Tensor& loss_mask_BS, const GlobalExpertLoad* global,
                         const torch::Tensor& loss_tokens) {
  LossBreakdown l;
  // A pipeline stage without the head contributes only its layers' auxiliary losses.
  l.lm = out.hidden_BSD.defined() ? torch::zeros({}, out.hidden_BSD.options().dtype(torch::kFloat32))
                                  : model::lm_loss(out, labels_BS, loss_mask_BS, loss_tokens);
  l.aux = torch::zeros({}, l.lm.options());
  l.z = torch::zeros({}, l.lm.options());
  std::vector<torch::Tensor> logits;
  for (const auto& layer : out.layers) {
    if (layer.aux_loss) l.aux = l.aux + *layer.aux_loss;
    if (layer.z_loss) l.z = l.z + *layer.z_loss;
    if (layer.router_logits_TE) logits.push_back(*layer.router_logits_TE);
  }
  if (c.moe_router_load_balancing_type == LoadBalancingType::global_aux_loss) {
    int64_t n = 0;
    for (const auto& layer : out.layers) {
      if (!layer.router_logits_TE) continue;
      const auto probs_TE = torch::softmax(*layer.router_logits_TE, -1, torch::kFloat32);
      l.aux = l.aux + (global ? global_aux_loss(probs_TE, global->load_LE[n], global->tokens, c.moe_router_topk)
                              : global_aux_loss(probs_TE, *layer.tokens_per_expert_E, static_cast<double>(probs_TE.size(0)),
                                                c.moe_router_topk));
      ++n;
    }
  }
  if (c.moe_router_load_balancing_type == LoadBalancingType::hf_pooled_aux_loss && !logits.empty()) {
    l.aux = hf_pooled_aux_loss(logits, *c.num_experts, c.moe_router_topk);
  }
  l.total = l.lm + c.moe_aux_loss_coeff * l.aux + c.moe_z_loss_coeff * l.z;
  return l;
}

}  // namespace moeforge::moe
