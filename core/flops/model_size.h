// defines: LayerParameters, layer_parameters, ParameterCounts, count_parameters,
//          FlopsPerStep, model_flops_per_step, hardware_flops_per_step
//
// Parameter counts and model FLOPs from the model config alone, by the formulas in
// docs/plan.md (Megatron's current and legacy FLOPs conventions, FlagPerf's "compute N",
// torchtitan's 6 x (N - N_embedding) + attention, and the hardware FLOPs of recomputation).
#pragma once

#include "core/config/config.h"

#include <cstdint>

namespace moeforge {

// Parameters of one decoder layer, split by what they belong to.
struct LayerParameters {
  int64_t attention = 0;      // q, k, v, o projections and q/k/v biases
  int64_t norms = 0;          // the two RMSNorm weights
  int64_t dense_ffn = 0;      // a dense layer's SwiGLU FFN (0 in MoE layers)
  int64_t router = 0;         // MoE router
  int64_t shared_expert = 0;  // shared expert and its sigmoid gate
  int64_t expert = 0;         // ONE routed expert
  int64_t num_experts = 0;
  int64_t topk = 0;

  int64_t total() const { return attention + norms + dense_ffn + router + shared_expert + expert * num_experts; }
  int64_t activated() const { return attention + norms + dense_ffn + router + shared_expert + expert * topk; }
  int64_t routed_experts() const { return expert * num_experts; }
};

LayerParameters layer_parameters(const ModelConfig& model, int64_t layer);

struct ParameterCounts {
  int64_t embedding = 0;     // padded_vocab * h
  int64_t output_layer = 0;  // padded_vocab * h when untied, else 0
  int64_t final_norm = 0;
  int64_t total = 0;
  int64_t activated = 0;                // with top-k of the routed experts, embedding and head included
  int64_t activated_non_embedding = 0;  // activated minus embedding and output layer
  // FlagPerf's N: L * (attention matmuls + 3 * h * activated FFN width) + V * h, the count its
  // 6N MFU uses (no norms, router, gate, biases or input embedding).
  int64_t flagperf_compute_n = 0;
  // torchtitan's N - N_embedding (get_moe_model_nparams_and_flops): the ACTIVE parameters (routed
  // experts x top-k / E; router, shared expert and its gate, norms, attention, final norm and an
  // untied output layer all counted) minus the input embedding. Tied weights count once, as the
  // embedding, so a tied model has no head in it.
  int64_t torchtitan_n = 0;
};

ParameterCounts count_parameters(const ModelConfig& model);

// Model FLOPs of one optimizer step of `batch` samples of `seq_length` tokens (forward and
// backward, no recomputation).
struct FlopsPerStep {
  int64_t megatron = 0;         // current convention: causal attention counted at half
  int64_t megatron_legacy = 0;  // before March 2025: s^2 attention term not halved
  int64_t six_n = 0;            // 6 * flagperf_compute_n * tokens
  // torchtitan: (6 * torchtitan_n + 12 * layers * heads * head_dim * s) * tokens; the attention
  // term is not halved for the causal mask and its N counts the router.
  int64_t torchtitan = 0;
};

FlopsPerStep model_flops_per_step(const ModelConfig& model, int64_t batch, int64_t seq_length);

// What the device executes in one step when activations are recomputed: Megatron's model FLOPs
// plus the recomputed forward (full: every decoder layer's forward, a third of its forward +
// backward, the output layer not recomputed;
// selective: the core attention's forward, QK^T and PV at the causal half). Equals
// model_flops_per_step().megatron without recomputation. Its ratio to the peak is the HFU.
int64_t hardware_flops_per_step(const ModelConfig& model, int64_t batch, int64_t seq_length,
                                RecomputeGranularity recompute);

}  // namespace moeforge
