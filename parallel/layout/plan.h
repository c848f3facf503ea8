// defines: StagePlan, CheckpointPlan, Plan, make_plan, plan_to_json, format_plan, kLossChunkBytes
//
// What `moeforge plan` reports for a resolved config and layout: parameter counts, model FLOPs,
// batch arithmetic, the pipeline bubble and a per-stage memory estimate. Formulas: docs/plan.md.
#pragma once

#include "core/config/config.h"
#include "core/flops/model_size.h"
#include "parallel/layout/layout.h"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace moeforge {

// Memory of one rank of a pipeline stage (every rank of a stage holds the same amounts).
struct StagePlan {
  int64_t stage = 0;
  std::vector<LayerRange> chunks;  // its layers, one range per model chunk
  int64_t first_layer = 0;
  int64_t num_layers = 0;
  int64_t parameters = 0;               // held by one rank: dense + its share of the experts
  int64_t expert_parameters = 0;        // the routed-expert part of `parameters`
  int64_t weight_bytes = 0;
  int64_t gradient_bytes = 0;
  int64_t optimizer_bytes = 0;              // fp32 master copy (bf16 only) + Adam moments
  int64_t optimizer_bytes_distributed = 0;  // the same sharded over DP (experts over expert-DP)
  int64_t activation_bytes_per_micro_batch = 0;
  int64_t activation_bytes_per_micro_batch_full_recompute = 0;
  // Forwards whose backward is still to come, at most: 1F1B min(PP - stage, M) micro-batches;
  // interleaved, chunk-micro-batches of 1/V of the stage's layers each.
  int64_t micro_batches_in_flight = 0;
  int64_t peak_bytes = 0;               // with the configured optimizer and recomputation
};

// What one save writes and holds, for both checkpoint formats (a user choosing between them sees
// both). Model bytes are the weights in the training dtype; optimizer bytes the fp32 master copy
// (bf16 only) and Adam's moments, as checkpoint.h lays them out.
struct CheckpointPlan {
  int64_t model_bytes = 0;
  int64_t optimizer_bytes = 0;
  // whole: rank 0 gathers every tensor into its host memory, then writes them alone.
  int64_t whole_rank0_host_bytes = 0;
  // sharded (TP 1 only, else 0): one writer per (stage, EP rank); the largest is EP rank 0 of a
  // stage, which holds the stage's dense tensors beside its experts.
  int64_t sharded_writers = 0;
  int64_t sharded_largest_shard_bytes = 0;
  int64_t bytes() const { return model_bytes + optimizer_bytes; }
};

// Bytes of logits one chunk of the fused LM head holds: core/kernels/cross_entropy.h's kChunkBytes,
// restated here because the plan runs without LibTorch (a test keeps the two equal).
inline constexpr int64_t kLossChunkBytes = int64_t{256} << 20;

struct Plan {
  std::string config_path;
  ParallelLayout layout;
  ParameterCounts parameters;
  int64_t parameters_per_layer = 0;  // first MoE layer (or layer 0)
  int64_t activated_parameters_per_layer = 0;
  FlopsPerStep flops_per_step;
  double flops_per_token_megatron = 0, flops_per_token_megatron_legacy = 0, flops_per_token_six_n = 0;
  int64_t tokens_per_step = 0;
  double bubble_fraction = 0;
  int64_t experts_per_ep_rank = 0;
  std::vector<StagePlan> stages;
  bool fused_loss = false;  // the LM head's loss runs fused (no whole logits), which the stages' memory counts
  CheckpointPlan checkpoint;
  std::vector<std::string> warnings;
  double flops_per_token_torchtitan = 0;
  // Megatron's model FLOPs plus the recomputed forward of training.recompute_granularity (the HFU's
  // numerator; equal to flops_per_step.megatron without recomputation).
  int64_t hardware_flops_per_step = 0;
  double hardware_flops_per_token = 0;
};

Plan make_plan(const ExperimentConfig& config, const std::string& config_path, const ParallelLayout& layout);

// Stable keys, documented in docs/plan.md.
nlohmann::json plan_to_json(const Plan& plan, const ExperimentConfig& config);

std::string format_plan(const Plan& plan, const ExperimentConfig& config);

}  // namespace moeforge
