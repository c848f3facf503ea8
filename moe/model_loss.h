// defines: LossBreakdown, GlobalExpertLoad, model_loss
//
// The training objective of a model's output: the LM loss plus the MoE layers' load-balancing and
// z losses with their coefficients, for every load-balancing type (the per-layer ones the MoE
// layer computes, the global and pooled ones computed here over all layers).
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include "core/config/config.h"
#include "core/model/gpt_model.h"

namespace moeforge::moe {

struct LossBreakdown {
  torch::Tensor total;  // what backward runs on
  torch::Tensor lm;     // mean cross-entropy
  torch::Tensor aux;    // load-balancing loss, unscaled (summed over layers for per-layer types)
  torch::Tensor z;      // z-loss, unscaled, summed over layers
};

// For global_aux_loss: the global batch's expert loads, one row per MoE layer of the output in
// order (slots per expert summed over the data-parallel ranks, averaged over the step's
// micro-batches so far, Megatron's running average), and the micro-batch's tokens over those ranks.
struct GlobalExpertLoad {
  torch::Tensor load_LE;
  double tokens = 0;
};

// lm + moe_aux_loss_coeff * aux + moe_z_loss_coeff * z, with the load-balancing type of the config.
// global_aux_loss without `global` (evaluation, one process outside training) uses the
// micro-batch's own loads: the per-micro-batch aux_loss. `loss_tokens`: as model::lm_loss's.
LossBreakdown model_loss(const ModelConfig& config, const model::ModelOutput& out, const torch::Tensor& labels_BS,
                         const torch::Tensor& loss_mask_BS, const GlobalExpertLoad* global = nullptr,
                         const torch::Tensor& loss_tokens = {});

}  // namespace moeforge::moe
