// defines: StepLosses, ReducedLosses, GlobalExpertLoads
//
// The losses of a step (or of an evaluation), accumulated on the device over its forwards and
// read once, then reduced in one place for training and evaluation alike: each TP rank's LM loss
// covers its chunk of the sequence under sequence parallelism (summed over TP), the LM loss lives
// on the last stage and the auxiliary losses on every stage (summed over PP), each DP rank saw its
// own samples (averaged over DP). Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include "core/config/config.h"
#include "core/model/gpt_model.h"
#include "moe/model_loss.h"
#include "parallel/comm/process_groups.h"
#include "parallel/layout/layout.h"

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace moeforge {

// Means over the forwards of every rank.
struct ReducedLosses {
  double lm = 0, aux = 0, z = 0, total = 0;  // aux and z unscaled, summed over MoE layers
  // Slots routed to each expert of each MoE layer over the global batch (host, fp64: exact, counts
  // stay far below 2^53); undefined for evaluation or without MoE layers.
  torch::Tensor load_LE;
};

class StepLosses {
 public:
  // Evaluation: the LM loss only.
  explicit StepLosses(torch::Device device);
  // Training: the losses and the expert loads; `chunks`, this rank's model chunks, place each
  // chunk's layers among the model's MoE layers.
  StepLosses(const ModelConfig& model, const std::vector<LayerRange>& chunks, torch::Device device);

  // A training forward of this rank's chunk `chunk`.
  void add(size_t chunk, const moe::LossBreakdown& loss, const model::ModelOutput& out);
  // An evaluation forward's LM loss.
  void add_lm(const torch::Tensor& lm);
  // One device read, then the reduction over TP (sequence parallel), PP and DP (collective over
  // those groups); the losses divided by `forwards`, each rank's count of forwards.
  ReducedLosses reduce(const ProcessGroups& groups, const ParallelLayout& layout, int64_t forwards) const;

 private:
  torch::Tensor losses_;  // fp64 on the device: lm, aux, z, total
  torch::Tensor load_LE_;  // int64 on the device, rows of other stages' layers zero
  // Per chunk, per layer of the chunk: its index among the model's MoE layers, or -1.
  std::vector<std::vector<int64_t>> moe_index_;
};

// global_aux_loss: the step's expert loads so far, per chunk, summed over the DP ranks.
class GlobalExpertLoads {
 public:
  // For a run whose model.moe_router_load_balancing_type is global_aux_loss; nullopt otherwise.
  static std::optional<GlobalExpertLoads> for_run(const ExperimentConfig& config, const ParallelLayout& layout,
                                                  size_t num_chunks, Communicator& dp);
  // `tokens_per_micro_batch`: the tokens of one micro-batch over all DP ranks.
  GlobalExpertLoads(size_t num_chunks, double tokens_per_micro_batch, Communicator& dp);
  // Adds the micro-batch's loads of the chunk's MoE layers (one all-reduce over DP for all of them;
  // Megatron: one per layer; the DP replicas of a stage run the same schedule, so their forwards
  // meet in the same order); returns the running average model_loss takes, or nullopt when the
  // chunk has no MoE layer.
  std::optional<moe::GlobalExpertLoad> add(size_t chunk, const model::ModelOutput& out);

 private:
  std::vector<torch::Tensor> sum_LE_;
  std::vector<int64_t> seen_;
  double tokens_;
  Communicator& dp_;
};

}  // namespace moeforge
