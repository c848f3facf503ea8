#include "core/model_size.h"

namespace moeforge {

namespace {
constexpr int64_t kSwigluMatrices = 3;  // gate, up, down
}

LayerParameters layer_parameters(const ModelConfig& m, int64_t layer) {
  const int64_t h = m.hidden_size;
  const int64_t q = m.query_projection_size();
  const int64_t kv = m.kv_projection_size();
  LayerParameters p;
  p.attention = h * (q + 2 * kv) + q * h + (m.add_qkv_bias ? q + 2 * kv : 0);
  p.norms = 2 * h;
  if (!m.is_moe_layer(layer)) {
    p.dense_ffn = kSwigluMatrices * h * *m.ffn_hidden_size;
    return p;
  }
  p.num_experts = *m.num_experts;
  p.topk = m.moe_router_topk;
  p.router = *m.num_experts * h;
  p.expert = kSwigluMatrices * h * *m.moe_ffn_hidden_size;
  if (m.moe_shared_expert_intermediate_size) {
    p.shared_expert = kSwigluMatrices * h * *m.moe_shared_expert_intermediate_size + (m.moe_shared_expert_gate ? h : 0);
  }
  return p;
}

ParameterCounts count_parameters(const ModelConfig& m) {
  const int64_t h = m.hidden_size;
  const int64_t V = m.padded_vocab_size();
  ParameterCounts c;
  c.embedding = V * h;
  c.output_layer = m.untie_embeddings_and_output_weights ? V * h : 0;
  c.final_norm = h;
  c.total = c.embedding + c.output_layer + c.final_norm;
  c.activated = c.total;
  const int64_t attention_matmuls = h * m.query_projection_size() * 2 + h * 2 * m.kv_projection_size();
  c.flagperf_compute_n = V * h;
  for (int64_t i = 0; i < m.num_layers; ++i) {
    const LayerParameters p = layer_parameters(m, i);
    c.total += p.total();
    c.activated += p.activated();
    const int64_t active_ffn_width =
        m.is_moe_layer(i) ? m.moe_router_topk * *m.moe_ffn_hidden_size + m.moe_shared_expert_intermediate_size.value_or(0)
                          : *m.ffn_hidden_size;
    c.flagperf_compute_n += attention_matmuls + kSwigluMatrices * h * active_ffn_width;
  }
  c.activated_non_embedding = c.activated - c.embedding - c.output_layer;
  return c;
}

FlopsPerStep model_flops_per_step(const ModelConfig& m, int64_t batch, int64_t s) {
  const int64_t h = m.hidden_size;
  const int64_t L = m.num_layers;
  const int64_t q = m.query_projection_size();
  const int64_t kv = m.kv_projection_size();
  const int64_t V = m.padded_vocab_size();
  const int64_t T = batch * s;
  const int64_t n_moe = m.num_moe_layers();
  const int64_t n_dense = L - n_moe;
  const int64_t f_dense = *m.ffn_hidden_size;
  const int64_t f_moe = m.is_moe() ? *m.moe_ffn_hidden_size : 0;
  const int64_t f_shared = m.moe_shared_expert_intermediate_size.value_or(0);
  const int64_t k = m.is_moe() ? m.moe_router_topk : 0;

  // Multiply-accumulates per token of every weight matrix; x2 for FLOPs, x3 for fwd + bwd.
  const int64_t matmul_macs_per_token = h * (f_dense * kSwigluMatrices * n_dense +
                                             (f_moe * k * kSwigluMatrices + f_shared * kSwigluMatrices) * n_moe) +
                                        L * (h * (q + 2 * kv) + q * h) + h * V;
  // QK^T and PV: 2 * s^2 * q MACs per sequence per layer forward, halved for the causal mask.
  const int64_t attention_causal = 6 * batch * s * s * q * L;
  FlopsPerStep f;
  f.megatron = 6 * T * matmul_macs_per_token + attention_causal;
  f.megatron_legacy = 6 * T * matmul_macs_per_token + 2 * attention_causal;
  f.six_n = 6 * T * count_parameters(m).flagperf_compute_n;
  return f;
}

}  // namespace moeforge
