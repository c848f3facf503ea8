// defines: Linear, Embedding, RMSNorm, RotaryEmbedding, SplitRegion, Attention, MLP, FeedForward,
//          FeedForwardOutput, DenseFeedForward, deferred_parameter, materialize
//
// The dense transformer building blocks, numerically as Hugging Face's Qwen2/Llama reference:
// RMSNorm in fp32, half-split RoPE, causal attention through LibTorch's
// scaled_dot_product_attention (flash attention on GPUs), SwiGLU. Model code knows nothing of
// parallelism. Shapes: Note [shape suffixes] (core/base/shapes.h).
//
// Deferred initialisation: every module creates its parameters on the meta device (shapes only,
// no memory), so building even a model far larger than host memory costs nothing. Whoever uses
// the model then materialises what it needs (materialize(), init_megatron(), a checkpoint load),
// and a rank of a parallel run materialises only the parameters it owns.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <vector>

namespace moeforge::model {

// A parameter of `shape` on the meta device, registered on `module` as `name`.
torch::Tensor deferred_parameter(torch::nn::Module& module, const std::string& name, torch::IntArrayRef shape);

// Allocates every parameter of `module` still on the meta device with `options` (uninitialised);
// rule-updated parameters in fp32 whatever `options` say.
void materialize(torch::nn::Module& module, const torch::TensorOptions& options);

// y = x W^T (+ b), W [out, in]: torch::nn::Linear's math without its eager initialisation.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight, bias;  // bias undefined when off
};
TORCH_MODULE(Linear);

// Rows of `weight` [V, D] by token id.
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num, int64_t dim);
  torch::Tensor forward(const torch::Tensor& ids);
  torch::Tensor weight;
};
TORCH_MODULE(Embedding);

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

// cos/sin tables of half-split RoPE: angles = position * theta^(-2i/Dh), repeated for both halves.
class RotaryEmbedding {
 public:
  RotaryEmbedding(int64_t head_dim, double theta);
  // cos_BSDh, sin_BSDh for position ids [B, S], in `dtype`.
  std::pair<torch::Tensor, torch::Tensor> tables(const torch::Tensor& position_ids_BS, torch::ScalarType dtype) const;

 private:
  // [Dh / 2], fp32: computed on the host as transformers does (the same bits on every device), and
  // kept on the device of the last call so a step copies it once, not per layer and micro-batch.
  mutable torch::Tensor inv_freq_;
};

// The boundaries of a block whose weights a runtime may split over ranks (Megatron's column-
// then row-parallel pair): the block's sizes come from its weights' and its inputs' shapes, so it
// runs whatever part it holds. `in` takes the block's input to what meets the split weights (as
// it is, or the whole sequence gathered from the ranks' chunks; the runtime sums its gradient
// over the ranks); `out` takes the block's partial output (summed over the ranks, or each rank's
// chunk of the sum; backward as it is, or gathered). `whole_input` is the input as the block's
// whole (unsplit) weights see it, `scale` marks a whole tensor computed from it that multiplies
// partial outputs (forward as it is, gradient summed). Unset, all are the identity: the whole
// block on one rank.
struct SplitRegion {
  std::function<torch::Tensor(const torch::Tensor&)> enter, leave, factor;
  std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& x_in)> whole;
  torch::Tensor in(const torch::Tensor& x) const { return enter ? enter(x) : x; }
  torch::Tensor out(const torch::Tensor& y) const { return leave ? leave(y) : y; }
  // x_in = in(x), whose gathered values it reuses.
  torch::Tensor whole_input(const torch::Tensor& x, const torch::Tensor& x_in) const { return whole ? whole(x, x_in) : x; }
  torch::Tensor scale(const torch::Tensor& t) const { return factor ? factor(t) : t; }
};

struct AttentionConfig {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  bool qkv_bias = false;
};

// The attention core, causal scaled-dot-product attention: the plain forward and its recomputation
// (core/model/recompute.h) both run it.
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool gqa);

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionConfig& c);
  torch::Tensor forward(const torch::Tensor& x_BSD, const torch::Tensor& cos_BSDh, const torch::Tensor& sin_BSDh);
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  SplitRegion region;  // q/k/v split by heads, o_proj by its input columns
  bool recompute_core = false;  // selective recomputation: recompute softmax(QK^T)V in backward

 private:
  AttentionConfig c_;
};
TORCH_MODULE(Attention);

// down(silu(gate(x)) * up(x)), no biases.
class MLPImpl : public torch::nn::Module {
 public:
  MLPImpl(int64_t hidden, int64_t ffn);
  torch::Tensor forward(const torch::Tensor& x);  // down_proj(activation(x))
  // SwiGLU of the gate and up projections: the first half, which an MoE layer's shared expert
  // runs during the dispatch exchange (the down projection during the combine).
  torch::Tensor activation(const torch::Tensor& x);
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

// What a layer's feed-forward part returns: its output and, for MoE layers, what the
// load-balancing losses need.
struct FeedForwardOutput {
  torch::Tensor y;                    // same shape as the input
  std::optional<torch::Tensor> router_logits_TE;  // MoE layers: [tokens, experts]
  std::optional<torch::Tensor> aux_loss;          // MoE layers with a per-layer loss: a scalar
  std::optional<torch::Tensor> tokens_per_expert_E;  // MoE layers: routed slots per expert
  std::optional<torch::Tensor> z_loss;               // MoE layers with a z-loss: a scalar
};

// The feed-forward half of a decoder layer: a dense MLP here, an MoE layer in moe/.
class FeedForward : public torch::nn::Module {
 public:
  virtual FeedForwardOutput forward(const torch::Tensor& x_BSD) = 0;
  // Parameters stacked along dim 0, one independent block per routed expert (an MoE layer's
  // expert weights): initialised block by block, and what expert parallelism splits.
  virtual std::vector<torch::Tensor> stacked_expert_weights() const { return {}; }
};

// A dense layer's SwiGLU FFN (the same parameters as MLP, named as the reference's layer.mlp).
class DenseFeedForward : public FeedForward {
 public:
  DenseFeedForward(int64_t hidden, int64_t ffn);
  FeedForwardOutput forward(const torch::Tensor& x_BSD) override;
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  SplitRegion region;  // gate/up split by rows, down_proj by its input columns
};

}  // namespace moeforge::model
