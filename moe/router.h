// defines: Router, Routing, load-balancing losses (Megatron's aux_loss and seq_aux_loss,
//          Hugging Face's pooled loss), z-loss
//
// Shapes (Note [shape suffixes], core/base/shapes.h): T tokens, E experts, K top-k, A slots.
#pragma once

#include "core/config/config.h"

#include <torch/torch.h>

#include <vector>

namespace moeforge::moe {

struct Routing {
  torch::Tensor logits_TE;   // router output, in the activation dtype
  torch::Tensor probs_TE;    // softmax over all experts, fp32 (what the aux losses use)
  torch::Tensor weights_TK;  // the k combine weights, in the activation dtype
  torch::Tensor experts_TK;  // the k chosen experts (int64)
};

// Variants (ModelConfig): moe_router_pre_softmax with or without moe_router_norm_topk_prob
// (Qwen: softmax over all, top-k, no renormalization; Mixtral: renormalized), or top-k on the
// logits then softmax over the k (Megatron's default). With moe_router_force_load_balancing the
// scores are computed as usual but slot k of token t goes to expert (t*K + k) mod E (see
// forced_experts); the combine weights are the variant's weights of those experts.
//
// With moe_router_enable_expert_bias (aux-loss-free balancing, DeepSeek-V3) the top-k selects by
// scores + expert_bias, and the combine weights are the variant's unbiased weights of the chosen
// experts. The scores are what the variant's top-k runs on: the softmax probabilities with
// pre-softmax routing (Qwen, Mixtral), the logits otherwise (Megatron allows the bias only with
// sigmoid scores, whose probabilities are its scores). The bias is model state, saved with the
// weights, kept in fp32 (core/model/rule_updated.h) and moved by update_expert_bias, never by a gradient.
class RouterImpl : public torch::nn::Module {
 public:
  explicit RouterImpl(const ModelConfig& config);
  Routing forward(const torch::Tensor& x_TD);
  // The weight follows the model's precision; the expert bias stays fp32.
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  using torch::nn::Module::to;
  torch::Tensor weight;       // [E, D]
  torch::Tensor expert_bias;  // [E] fp32; undefined without moe_router_enable_expert_bias

 private:
  int64_t topk_;
  bool pre_softmax_, norm_topk_, force_balance_;
};
TORCH_MODULE(Router);

// The forced assignment of T tokens to K of E experts: slot (t, k) -> (t*K + k) mod E. Round robin
// over the T*K slots, so every expert gets floor or ceil of T*K/E, and K <= E consecutive ids are
// distinct. A function of the position only: the same in every layer, micro-batch, recomputation
// and layout, with no random numbers (a benchmark compares chips, not seeds).
torch::Tensor forced_experts(int64_t T, int64_t K, int64_t E, const torch::TensorOptions& options);

// Aux-loss-free balancing's update, in place: bias_E += rate * sign(mean(load_E) - load_E) in fp32,
// where load_E [E] counts the slots routed to each expert over a whole global batch (every
// micro-batch of every data- and expert-parallel rank). Overloaded experts are pushed down and idle
// ones up by the same step; equal loads leave the bias unchanged.
void update_expert_bias(torch::Tensor& bias_E, const torch::Tensor& load_E, double rate);

// Slots per expert id in [0, bins) (int64, on experts_TK's device). A scatter-add of ones, not
// bincount: CUDA's bincount reads its input's maximum on the host, a device sync per call.
torch::Tensor slots_per_expert(const torch::Tensor& experts_TK, int64_t bins);

// Megatron's capacity limit: each expert keeps at most ceil(T * K / E * factor) slots, those of
// highest probability (policy probs) or the earliest tokens (policy position). Returns the expert
// of each slot, or num_experts where the slot is dropped.
torch::Tensor apply_capacity(const torch::Tensor& experts_TK, const torch::Tensor& weights_TK, int64_t num_experts,
                             double capacity_factor, TokenDropPolicy policy);

// Megatron's switch load-balancing loss of one layer (without the coefficient):
// E / (K * T^2) * sum_e (sum_t p[t, e]) * count_e; 1 under perfectly uniform routing.
// Slots routed to dropped (id num_experts) are not counted.
torch::Tensor aux_loss(const torch::Tensor& probs_TE, const torch::Tensor& experts_TK, int64_t num_experts);

// Megatron's global_aux_loss of one layer: E / (K * T * T_global) * sum_e (sum_t p[t, e]) * load_e,
// with this micro-batch's T tokens and the global batch's loads `load_E` over `global_tokens`
// tokens (the micro-batch's tokens on every data-parallel rank). On DP ranks whose gradients are
// averaged this is the gradient one process computes with the union of their micro-batches (the
// 1/DP Megatron-LM #3672 lost), and the DP-averaged value is that process's loss.
torch::Tensor global_aux_loss(const torch::Tensor& probs_TE, const torch::Tensor& load_E, double global_tokens,
                              int64_t topk);

// Megatron's sequence-level variant: the same per sequence of `seq_length` tokens, averaged.
torch::Tensor seq_aux_loss(const torch::Tensor& probs_TE, const torch::Tensor& experts_TK, int64_t num_experts,
                           int64_t seq_length);

// Hugging Face's loss over the router logits of all layers pooled together:
// E * sum_e (fraction of slots routed to e) * (mean probability of e); K under uniform routing.
torch::Tensor hf_pooled_aux_loss(const std::vector<torch::Tensor>& logits_TE_per_layer, int64_t num_experts, int64_t topk);

// Router z-loss: mean over tokens of logsumexp(logits)^2.
torch::Tensor z_loss(const torch::Tensor& logits_TE);

}  // namespace moeforge::moe
