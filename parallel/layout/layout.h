// defines: ParallelLayout, RankCoordinates, LayerRange, format_layer_ranges
//
// The one object that owns the parallel degree arithmetic (torchtitan's ParallelDims) and every
// rule a layout must satisfy (degrees, EP within DP, experts divisible by EP, heads and widths
// divisible by TP, layers per stage, the batch split, tied embeddings and pooled router losses
// under PP, parallel.world_size). Created once at start-up from the config and the world size;
// `plan`, `train --dry-run`, `convert`, `report` and the trainer all create it the same way. Rank
// order is Megatron's tp-cp-ep-dp-pp with CP = 1: tensor-parallel ranks innermost (consecutive,
// the fastest links), pipeline outermost, so each stage's ranks are contiguous, and
// expert-parallel ranks are TP apart inside a stage.
//
//   world = PP * DP * TP,   EP divides DP,   expert-data-parallel EDP = DP / EP
//   rank  = (pp_rank * DP + dp_rank) * TP + tp_rank,     dp_rank = edp_rank * EP + ep_rank
// The routed experts' tensor-parallel size is TP (Megatron-Core's default): each EP rank's
// experts are split over its TP ranks like the dense FFN.
// With V virtual stages per pipeline rank (interleaved 1F1B) the layers are cut into PP x V
// chunks; virtual stage v = chunk * PP + pp_rank, so rank r runs chunks r, r + PP, ... of the model.
#pragma once

#include "core/config/config.h"

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

struct LayerRange {
  int64_t begin = 0, end = 0;  // decoder layers [begin, end)
};

// "0-3", or "0-1,8-9" for a stage with two chunks ("3" for one layer).
std::string format_layer_ranges(const std::vector<LayerRange>& ranges);

struct RankCoordinates {
  int64_t pp = 0;   // pipeline stage
  int64_t tp = 0;   // index in the tensor-parallel group
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
  int64_t tp() const { return tp_; }
  // parallel.sequence_parallel with TP > 1 (with TP 1 there is nothing to split, as in Megatron).
  bool sequence_parallel() const { return sp_; }
  int64_t dp() const { return dp_; }
  int64_t ep() const { return ep_; }
  int64_t edp() const { return dp_ / ep_; }
  int64_t vpp() const { return vpp_; }  // model chunks per pipeline rank
  int64_t micro_batches_per_step() const { return micro_batches_; }

  // Layers held by each pipeline rank (all of its chunks).
  const std::vector<int64_t>& layers_per_stage() const { return layers_per_stage_; }
  // The layers pipeline rank `stage` runs, one range per model chunk, in chunk order.
  std::vector<LayerRange> chunks(int64_t stage) const;
  // The pipeline rank and the model chunk (index in chunks(stage)) that hold decoder layer `layer`.
  int64_t stage_of_layer(int64_t layer) const;
  int64_t chunk_of_layer(int64_t layer) const;
  // Routed experts per EP rank (0 for a dense model); EP rank r holds [r * n, (r + 1) * n).
  int64_t experts_per_rank() const { return num_experts_ / ep_; }

  RankCoordinates coordinates(int64_t rank) const;
  // The ranks of each group `rank` belongs to, in group order.
  std::vector<int64_t> pipeline_group(int64_t rank) const;
  std::vector<int64_t> data_parallel_group(int64_t rank) const;
  std::vector<int64_t> expert_parallel_group(int64_t rank) const;
  std::vector<int64_t> expert_data_parallel_group(int64_t rank) const;
  std::vector<int64_t> tensor_parallel_group(int64_t rank) const;

  // "world 8 = PP 2 x DP 4 (EP 4 x expert-DP 1), layers per stage [12, 12], 128 micro-batches per step"
  // (with " x TP 2" after the DP factor when TP > 1, " x TP 2 (sequence-parallel)" with SP)
  std::string describe() const;

 private:
  int64_t world_ = 1, pp_ = 1, tp_ = 1, vpp_ = 1, dp_ = 1, ep_ = 1, micro_batches_ = 1, num_experts_ = 0;
  bool sp_ = false;
  std::vector<int64_t> layers_per_stage_;
  std::vector<int64_t> layers_per_virtual_stage_;  // PP x V entries, virtual stage order
};

}  // namespace moeforge
