#include "core/model/transformer.h"

#include "core/kernels/rmsnorm.h"
#include "core/kernels/rope.h"
#include "core/kernels/swiglu.h"
#include "core/kernels/wgrad_accumulation.h"
#include "core/model/recompute.h"
#include "core/model/rule_updated.h"

namespace moeforge::model {


torch::Tensor deferred_parameter(torch::nn::Module& module, const std::string& name, torch::IntArrayRef shape) {
  return module.register_parameter(name, torch::empty(shape, torch::TensorOptions().device(torch::kMeta)));
}

void materialize(torch::nn::Module& module, const torch::TensorOptions& options) {
  torch::NoGradGuard no_grad;
  for (auto& item : module.named_parameters()) {
    auto& p = item.value();
    if (!p.is_meta()) continue;
    const auto param_options = is_rule_updated(item.key()) ? options.dtype(torch::kFloat32) : options;
    // The parameter object must stay the one its module and its member field hold. set_data()
    // refuses a meta -> real swap (no "compatible shallow-copy type"); after that check it does
    // exactly this: take over the new tensor's storage, sizes, device and dispatch keys, keeping
    // requires_grad and the version counter. Nothing has run on the meta tensor, so no autograd
    // state refers to its old device.
    p.unsafeGetTensorImpl()->shallow_copy_from(torch::empty(p.sizes(), param_options).getIntrusivePtr());
  }
}

LinearImpl::LinearImpl(int64_t in, int64_t out, bool with_bias) {
  weight = deferred_parameter(*this, "weight", {out, in});
  if (with_bias) bias = deferred_parameter(*this, "bias", {out});
}

// Used once per forward: its weight gradient may go straight into the optimizer's fp32 main_grad.
torch::Tensor LinearImpl::forward(const torch::Tensor& x) { return kernels::linear(x, weight, bias); }

EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t dim) { weight = deferred_parameter(*this, "weight", {num, dim}); }

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) { return torch::embedding(weight, ids); }

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) { weight = deferred_parameter(*this, "weight", {dim}); }

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) { return kernels::rms_norm(x, weight, eps_); }

RotaryEmbedding::RotaryEmbedding(int64_t head_dim, double theta) {
  // host: once, at construction (see inv_freq_).
  const auto i = torch::arange(0, head_dim, 2, torch::kInt64).to(torch::kFloat32);
  // host: as above.
  inv_freq_ = 1.0 / torch::pow(torch::tensor(theta, torch::kFloat64).to(torch::kFloat32), i / static_cast<double>(head_dim));
}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::tables(const torch::Tensor& position_ids_BS,
                                                                torch::ScalarType dtype) const {
  if (inv_freq_.device() != position_ids_BS.device()) inv_freq_ = inv_freq_.to(position_ids_BS.device());
  const auto freqs = position_ids_BS.unsqueeze(-1).to(torch::kFloat32) * inv_freq_;
  const auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool gqa) {
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true,
                                          /*scale=*/std::nullopt, /*enable_gqa=*/gqa);
}

AttentionImpl::AttentionImpl(const AttentionConfig& c) : c_(c) {
  q_proj = register_module("q_proj", Linear(c.hidden, c.heads * c.head_dim, c.qkv_bias));
  k_proj = register_module("k_proj", Linear(c.hidden, c.kv_heads * c.head_dim, c.qkv_bias));
  v_proj = register_module("v_proj", Linear(c.hidden, c.kv_heads * c.head_dim, c.qkv_bias));
  o_proj = register_module("o_proj", Linear(c.heads * c.head_dim, c.hidden, false));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x_BSD, const torch::Tensor& cos_BSDh,
                                     const torch::Tensor& sin_BSDh) {
  // The heads this module holds (all of them, or a tensor-parallel rank's share), over the whole
  // sequence (x_BSD may be a sequence-parallel chunk of it).
  const int64_t H = q_proj->weight.size(0) / c_.head_dim, G = k_proj->weight.size(0) / c_.head_dim;
  const auto x_in = region.in(x_BSD);
  const int64_t B = x_in.size(0), S = x_in.size(1);
  // RoPE on the projections' own layout [B, S, heads, Dh] (contiguous), then the heads move forward.
  const auto q_BHSDh = kernels::rope(q_proj(x_in).view({B, S, H, c_.head_dim}), cos_BSDh, sin_BSDh).transpose(1, 2);
  const auto k_BGSDh = kernels::rope(k_proj(x_in).view({B, S, G, c_.head_dim}), cos_BSDh, sin_BSDh).transpose(1, 2);
  const auto v_BGSDh = v_proj(x_in).view({B, S, G, c_.head_dim}).transpose(1, 2);
  // GQA: SDPA's enable_gqa shares each key/value head with H / G query heads.
  const bool gqa = G != H;
  const auto out_BHSDh = recompute_core && torch::GradMode::is_enabled()
                             ? checkpointed_attention(q_BHSDh, k_BGSDh, v_BGSDh, gqa)
                             : causal_attention(q_BHSDh, k_BGSDh, v_BGSDh, gqa);
  return region.out(o_proj(out_BHSDh.transpose(1, 2).reshape({B, S, H * c_.head_dim})));
}

MLPImpl::MLPImpl(int64_t hidden, int64_t ffn) {
  gate_proj = register_module("gate_proj", Linear(hidden, ffn, false));
  up_proj = register_module("up_proj", Linear(hidden, ffn, false));
  down_proj = register_module("down_proj", Linear(ffn, hidden, false));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) { return down_proj(activation(x)); }

torch::Tensor MLPImpl::activation(const torch::Tensor& x) { return kernels::swiglu(gate_proj(x), up_proj(x)); }

DenseFeedForward::DenseFeedForward(int64_t hidden, int64_t ffn) {
  gate_proj = register_module("gate_proj", Linear(hidden, ffn, false));
  up_proj = register_module("up_proj", Linear(hidden, ffn, false));
  down_proj = register_module("down_proj", Linear(ffn, hidden, false));
}

FeedForwardOutput DenseFeedForward::forward(const torch::Tensor& x_BSD) {
  FeedForwardOutput out;
  const auto x_in = region.in(x_BSD);
  out.y = region.out(down_proj(kernels::swiglu(gate_proj(x_in), up_proj(x_in))));
  return out;
}

}  // namespace moeforge::model
