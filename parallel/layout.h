// defines: ParallelLayout, RankCoordinates
//
// The one object that owns the parallel degree arithmetic (torchtitan's ParallelDims) and every
// rule a layout must satisfy (degrees, EP within DP, experts divisible by EP, layers per stage,
// the batch split, tied embeddings and pooled router losses under PP, parallel.world_size).
// Created once at start-up from the config and the world size; `plan`, `train --dry-run`,
// `convert`, `report` and the trainer all create it the same way. Rank order is
// Megatron's tp-cp-ep-dp-pp with TP = CP = 1: pipeline outermost, so each stage's ranks are
// contiguous, and expert-parallel ranks are consecutive inside a stage.
//
//   world = PP * DP,   EP divides DP,   expert-data-parallel EDP = DP / EP
//   rank  = pp_rank * DP + dp_rank,     dp_rank = edp_rank * EP + ep_rank
#pragma once

#include "core/config.h"

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

struct RankCoordinates {
  int64_t pp = 0;   // pipeline stage
  int64_t dp = 0;   // index in the data-parallel group
  int64_t ep = 0;   // index in the expert-parallel group
  int64_t edp = 0;  // index in the expert-data-parallel group
};

class ParallelLayout {
 public:
  // Validates every degree against the config; throws one UserError that lists each problem and
  // all the factors involved.
  static ParallelLayout create(const ExperimentConfig& config, int64_t world_size);

  int64_t world() const { return world_; }
  int64_t pp() const { return pp_; }
  int64_t dp() const { return dp_; }
  int64_t ep() const { return ep_; }
  int64_t edp() const { return dp_ / ep_; }
  int64_t micro_batches_per_step() const { return micro_batches_; }

  // Layers of stage `stage`: [first_layer(stage), first_layer(stage) + layers_on(stage)).
  const std::vector<int64_t>& layers_per_stage() const { return layers_per_stage_; }
  int64_t first_layer(int64_t stage) const;
  int64_t stage_of_layer(int64_t layer) const;
  // Routed experts per EP rank (0 for a dense model); EP rank r holds [r * n, (r + 1) * n).
  int64_t experts_per_rank() const { return num_experts_ / ep_; }

  RankCoordinates coordinates(int64_t rank) const;
  // The ranks of each group `rank` belongs to, in group order.
  std::vector<int64_t> pipeline_group(int64_t rank) const;
  std::vector<int64_t> data_parallel_group(int64_t rank) const;
  std::vector<int64_t> expert_parallel_group(int64_t rank) const;
  std::vector<int64_t> expert_data_parallel_group(int64_t rank) const;

  // "world 8 = PP 2 x DP 4 (EP 4 x EDP 1), 24 layers as [12, 12], 128 micro-batches per step"
  std::string describe() const;

 private:
  int64_t world_ = 1, pp_ = 1, dp_ = 1, ep_ = 1, micro_batches_ = 1, num_experts_ = 0;
  std::vector<int64_t> layers_per_stage_;
};

}  // namespace moeforge
