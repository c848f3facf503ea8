#include "core/model/gpt_model.h"

#include "core/kernels/cross_entropy.h"
#include "core/model/recompute.h"
#include "core/model/rule_updated.h"

#include <algorithm>
#include <cmath>

namespace moeforge::model {

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c, int64_t layer, const FeedForwardFactory& make_ffn) {
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.norm_epsilon));
  AttentionConfig a;
  a.hidden = c.hidden_size;
  a.heads = c.num_attention_heads;
  a.kv_heads = *c.num_query_groups;
  a.head_dim = c.head_dim();
  a.qkv_bias = c.add_qkv_bias;
  self_attn = register_module("self_attn", Attention(a));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.norm_epsilon));
  mlp = register_module("mlp", make_ffn(c, layer));
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x_BSD, const torch::Tensor& cos, const torch::Tensor& sin,
                                        FeedForwardOutput& ffn_out) {
  const auto h_BSD = x_BSD + self_attn(input_layernorm(x_BSD), cos, sin);
  ffn_out = mlp->forward(post_attention_layernorm(h_BSD));
  return h_BSD + ffn_out.y;
}

GPTModelImpl::GPTModelImpl(const ModelConfig& c, const FeedForwardFactory& make_ffn)
    : config_(c), rope_(c.head_dim(), c.rotary_base) {
  embed_tokens = register_module("embed_tokens", Embedding(c.padded_vocab_size(), c.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(DecoderLayer(c, i, make_ffn));
  norm = register_module("norm", RMSNorm(c.hidden_size, c.norm_epsilon));
  if (c.untie_embeddings_and_output_weights) {
    lm_head = register_module("lm_head", Linear(c.hidden_size, c.padded_vocab_size(), false));
  }
}

ModelOutput GPTModelImpl::forward(const torch::Tensor& tokens_BS, const torch::Tensor& position_ids_BS) {
  return forward_layers(tokens_BS, position_ids_BS, 0, static_cast<int64_t>(layers->size()));
}

ModelOutput GPTModelImpl::forward_layers(const torch::Tensor& input, const torch::Tensor& position_ids_BS, int64_t begin,
                                         int64_t end, HeadOutput head) {
  ModelOutput out;
  auto x_BSD = begin == 0 ? embed_tokens(input) : input;
  const auto [cos, sin] = rope_.tables(position_ids_BS, x_BSD.scalar_type());
  out.layers.resize(static_cast<size_t>(end - begin));
  const bool full = recompute_ == RecomputeGranularity::full && torch::GradMode::is_enabled();
  for (int64_t i = begin; i < end; ++i) {
    auto* layer = layers[static_cast<size_t>(i)]->as<DecoderLayer>();
    auto& stats = out.layers[static_cast<size_t>(i - begin)];
    x_BSD = full ? checkpointed_layer(layer, x_BSD, cos, sin, stats) : layer->forward(x_BSD, cos, sin, stats);
  }
  if (end < static_cast<int64_t>(layers->size())) {
    out.hidden_BSD = x_BSD;
    return out;
  }
  x_BSD = norm(x_BSD);
  if (head == HeadOutput::logits) {
    out.logits_BSV = lm_head ? lm_head(x_BSD) : torch::matmul(x_BSD, embed_tokens->weight.t());
  } else {
    out.head_input_BSD = x_BSD;
    out.head_weight_VD = lm_head ? lm_head->weight : embed_tokens->weight;
    out.head_weight_tied = lm_head.is_empty();
  }
  return out;
}

void GPTModelImpl::set_recompute(RecomputeGranularity granularity) {
  recompute_ = granularity;
  for (size_t i = 0; i < layers->size(); ++i) {
    layers[i]->as<DecoderLayer>()->self_attn->recompute_core = granularity == RecomputeGranularity::selective;
  }
}

torch::Tensor lm_loss(const ModelOutput& out, const torch::Tensor& labels_BS, const torch::Tensor& loss_mask_BS,
                      const torch::Tensor& loss_tokens) {
  const auto labels_T = labels_BS.reshape({-1}), mask_T = loss_mask_BS.reshape({-1});
  if (out.logits_BSV.defined()) {
    return kernels::masked_cross_entropy(out.logits_BSV.reshape({-1, out.logits_BSV.size(-1)}), labels_T, mask_T,
                                         loss_tokens);
  }
  const auto& h = out.head_input_BSD;
  // An untied head's weight has no other use: its gradient may go straight into main_grad.
  return kernels::lm_head_cross_entropy(h.reshape({-1, h.size(-1)}), out.head_weight_VD, labels_T, mask_T,
                                        !out.head_weight_tied, loss_tokens);
}

namespace {

// A 64-bit stream seed from (seed, name, block): FNV-1a over the name, mixed by splitmix64.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
uint64_t stream_seed(uint64_t seed, const std::string& name, int64_t block) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (const unsigned char ch : name) h = (h ^ ch) * 0x100000001B3ULL;
  return mix(mix(h ^ mix(seed)) ^ static_cast<uint64_t>(block + 1));
}

}  // namespace

void init_megatron_parameter(const ModelConfig& c, const std::string& name, torch::Tensor& t, uint64_t seed,
                             std::optional<int64_t> first_block) {
  torch::NoGradGuard no_grad;
  if (t.numel() == 0) return;
  const bool is_norm = name.find("layernorm") != std::string::npos || name == "norm.weight";
  if (is_norm) {
    t.fill_(1.0);
    return;
  }
  if (name.ends_with(".bias") || is_rule_updated(name)) {
    t.zero_();
    return;
  }
  const bool output = name.find("o_proj") != std::string::npos || name.find("down_proj") != std::string::npos;
  const double std = output ? c.init_method_std / std::sqrt(2.0 * static_cast<double>(c.num_layers)) : c.init_method_std;
  // Drawn on the CPU in fp32 (the same numbers on every device), then copied into place.
  auto draw = [&](torch::Tensor part, int64_t block) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(stream_seed(seed, name, block));
    auto values = torch::empty(part.sizes(), torch::kFloat32);  // host: drawn by the CPU generator
    values.normal_(0.0, std, gen);
    part.copy_(values);
  };
  if (!first_block) return draw(t, -1);
  for (int64_t b = 0; b < t.size(0); ++b) draw(t[b], *first_block + b);
}

void init_megatron(GPTModelImpl& model, uint64_t seed) {
  materialize(model, torch::TensorOptions().dtype(torch::kFloat32));
  std::vector<const c10::TensorImpl*> stacked;
  for (const auto& layer : *model.layers) {
    for (const auto& w : layer->as<DecoderLayerImpl>()->mlp->stacked_expert_weights()) stacked.push_back(w.unsafeGetTensorImpl());
  }
  for (auto& item : model.named_parameters()) {
    const bool blocks = std::find(stacked.begin(), stacked.end(), item.value().unsafeGetTensorImpl()) != stacked.end();
    init_megatron_parameter(model.config(), item.key(), item.value(), seed, blocks ? std::optional<int64_t>(0) : std::nullopt);
  }
}

}  // namespace moeforge::model
