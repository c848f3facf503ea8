#include "core/flops/model_size.h"

#include "core/base/checked_int.h"

namespace moeforge {

namespace {
constexpr int64_t kSwigluMatrices = 3;  // gate, up, down

// Counts come from configs: every operation is checked (core/base/checked_int.h).
using N = CheckedInt;

N total_of(const LayerParameters& p) {
  return N(p.attention) + p.norms + p.dense_ffn + p.router + p.shared_expert + N(p.expert) * p.num_experts;
}
N activated_of(const LayerParameters& p) {
  return N(p.attention) + p.norms + p.dense_ffn + p.router + p.shared_expert + N(p.expert) * p.topk;
}

}  // namespace

LayerParameters layer_parameters(const ModelConfig& m, int64_t layer) {
  const N h = m.hidden_size;
  const N q = m.query_projection_size();
  const N kv = m.kv_projection_size();
  LayerParameters p;
  p.attention = (h * (q + 2 * kv) + q * h + (m.add_qkv_bias ? q + 2 * kv : N(0))).v;
  p.norms = (2 * h).v;
  if (!m.is_moe_layer(layer)) {
    p.dense_ffn = (kSwigluMatrices * h * *m.ffn_hidden_size).v;
    return p;
  }
  p.num_experts = *m.num_experts;
  p.topk = m.moe_router_topk;
  p.router = (*m.num_experts * h).v;
  p.expert = (kSwigluMatrices * h * *m.moe_ffn_hidden_size).v;
  if (m.moe_shared_expert_intermediate_size) {
    p.shared_expert = (kSwigluMatrices * h * *m.moe_shared_expert_intermediate_size + (m.moe_shared_expert_gate ? h : N(0))).v;
  }
  total_of(p);  // the whole layer must be countable too
  return p;
}

ParameterCounts count_parameters(const ModelConfig& m) {
  const N h = m.hidden_size;
  const N V = m.padded_vocab_size();
  N total = V * h + (m.untie_embeddings_and_output_weights ? V * h : N(0)) + h;
  N activated = total;
  const N attention_matmuls = h * m.query_projection_size() * 2 + h * 2 * m.kv_projection_size();
  N compute_n = V * h;
  for (int64_t i = 0; i < m.num_layers; ++i) {
    const LayerParameters p = layer_parameters(m, i);
    total += total_of(p);
    activated += activated_of(p);
    const N active_ffn_width =
        m.is_moe_layer(i) ? N(m.moe_router_topk) * *m.moe_ffn_hidden_size + m.moe_shared_expert_intermediate_size.value_or(0)
                          : N(*m.ffn_hidden_size);
    compute_n += attention_matmuls + kSwigluMatrices * h * active_ffn_width;
  }
  ParameterCounts c;
  c.embedding = (V * h).v;
  c.output_layer = m.untie_embeddings_and_output_weights ? c.embedding : 0;
  c.final_norm = h.v;
  c.total = total.v;
  c.activated = activated.v;
  c.flagperf_compute_n = compute_n.v;
  c.activated_non_embedding = c.activated - c.embedding - c.output_layer;
  c.torchtitan_n = c.activated - c.embedding;
  return c;
}

FlopsPerStep model_flops_per_step(const ModelConfig& m, int64_t batch, int64_t s) {
  const N h = m.hidden_size;
  const N L = m.num_layers;
  const N q = m.query_projection_size();
  const N kv = m.kv_projection_size();
  const N V = m.padded_vocab_size();
  const N T = N(batch) * s;
  const N n_moe = m.num_moe_layers();
  const N n_dense = L - n_moe;
  const N f_dense = *m.ffn_hidden_size;
  const N f_moe = m.is_moe() ? *m.moe_ffn_hidden_size : 0;
  const N f_shared = m.moe_shared_expert_intermediate_size.value_or(0);
  const N k = m.is_moe() ? m.moe_router_topk : 0;

  // Multiply-accumulates per token of every weight matrix; x2 for FLOPs, x3 for fwd + bwd.
  const N matmul_macs_per_token = h * (f_dense * kSwigluMatrices * n_dense +
                                       (f_moe * k * kSwigluMatrices + f_shared * kSwigluMatrices) * n_moe) +
                                  L * (h * (q + 2 * kv) + q * h) + h * V;
  // QK^T and PV: 2 * s^2 * q MACs per sequence per layer forward, halved for the causal mask.
  const N attention_causal = 6 * N(batch) * s * s * q * L;
  FlopsPerStep f;
  f.megatron = (6 * T * matmul_macs_per_token + attention_causal).v;
  f.megatron_legacy = (6 * T * matmul_macs_per_token + 2 * attention_causal).v;
  const ParameterCounts counts = count_parameters(m);
  f.six_n = (6 * T * counts.flagperf_compute_n).v;
  // heads x head_dim is the query projection's width (torchtitan's dim when head_dim = dim / heads).
  f.torchtitan = (T * (6 * N(counts.torchtitan_n) + 12 * L * q * s)).v;
  return f;
}

int64_t hardware_flops_per_step(const ModelConfig& m, int64_t batch, int64_t s, RecomputeGranularity recompute) {
  const N model = model_flops_per_step(m, batch, s).megatron;
  switch (recompute) {
    case RecomputeGranularity::none:
      return model.v;
    case RecomputeGranularity::full: {
      // Every decoder layer's forward again (gpt_model.cpp checkpoints the layers, not the output
      // layer): forward is 2 of the 6 FLOPs per MAC of forward + backward, attention included.
      const N head = 6 * N(batch) * s * m.hidden_size * m.padded_vocab_size();
      return (model + (model - head).v / 3).v;
    }
    case RecomputeGranularity::selective:
      // QK^T and PV forward: 2 matmuls x 2 FLOPs x s^2 x q per sequence per layer, causal half.
      return (model + 2 * N(batch) * s * s * m.query_projection_size() * m.num_layers).v;
  }
  return model.v;
}

}  // namespace moeforge
