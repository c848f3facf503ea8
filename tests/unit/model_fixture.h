// defines: small_moe_config (the model configuration of the in-process MoE tests)
#pragma once

#include "core/config/config.h"

namespace moeforge::test {

// Two MoE layers, hidden 64, 8 experts of 32 with top-2 (Qwen's pre-softmax routing), a gated
// shared expert of 64, vocabulary 256, untied head: small enough for a test, every MoE part present.
inline ModelConfig small_moe_config() {
  ModelConfig m;
  m.num_layers = 2;
  m.hidden_size = 64;
  m.num_attention_heads = 4;
  m.num_query_groups = 4;
  m.kv_channels = 16;
  m.ffn_hidden_size = 128;
  m.vocab_size = 256;
  m.max_position_embeddings = 32;
  m.num_experts = 8;
  m.moe_ffn_hidden_size = 32;
  m.moe_router_topk = 2;
  m.moe_router_pre_softmax = true;
  m.moe_shared_expert_intermediate_size = 64;
  m.moe_shared_expert_gate = true;
  m.untie_embeddings_and_output_weights = true;
  return m;
}

}  // namespace moeforge::test
