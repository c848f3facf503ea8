// defines: the collapse thresholds, LayerLoad, RoutingCollapse, CollapseCriterion, RoutingHealth,
//          layer_loads, routing_collapse_json, routing_collapse_message, routing_collapse_causes
//
// Routing collapse: a router that sends every token to a few experts while the auxiliary loss
// still looks fine (issue 34). The trainer feeds each iteration's expert loads (global: summed
// over DP and PP, so every EP rank's tokens are in them) to a RoutingHealth on rank 0; when a MoE
// layer stays collapsed for kCollapseIterations in a row past the start-up, it warns once, naming
// the layers and the settings that usually cause it, and writes the event into that iteration's
// metrics.jsonl line, where `moeforge report` finds it. Shapes: Note [shape suffixes]
// (core/base/shapes.h).
#pragma once

#include "core/config/config.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

// The busiest expert at 4x the mean: with K of E experts per token the ratio ranges from 1
// (balanced) to E/K (every token on the same K experts); a balanced run stays under 3x after its
// first iterations (the quickstart's test). Where E/K < 4 only idle experts can show a collapse.
inline constexpr double kCollapseMaxOverMean = 4.0;
// A quarter of the experts idle: a router that has given up on them. A few idle experts are
// common in small healthy runs (from iteration 30 on, its busiest expert under 3x the mean, the
// quickstart still has up to 5 of its 60 idle in a layer).
inline constexpr double kCollapseIdleFraction = 0.25;
// An idle expert counts only where the batch gives each expert this many slots on average:
// under even routing an expert then stays empty with probability about e^-16, while with fewer
// slots than experts (small test batches) some must be idle whatever the router does.
inline constexpr double kIdleMinExpectedSlots = 16.0;
// Ten iterations in a row: long against noise, short against any real run.
inline constexpr int64_t kCollapseIterations = 10;
// Iterations 1-20 are not counted: a random router often starts collapsed and the balancing loss
// evens it out within them (the healthy quickstart starts with its busiest experts at 6-7x the
// mean, above 4x in some layer for its first 15 iterations, then only now and then).
inline constexpr int64_t kCollapseGraceIterations = 20;

// One MoE layer's load over one iteration's global batch.
struct LayerLoad {
  double max_over_mean = 0;  // routed slots of the busiest expert over the mean per expert
  int64_t idle_experts = 0;  // experts that received no slot
};

// A collapse the detector confirmed.
struct RoutingCollapse {
  int64_t first_iteration = 0;  // where the layers' streak began
  int64_t iteration = 0;        // the iteration that completed kCollapseIterations
  int64_t num_moe_layers = 0;
  std::vector<int64_t> moe_layers;  // indices among the MoE layers (expert_load_per_layer's order)
  std::vector<LayerLoad> loads;     // theirs at `iteration`
};

// Whether a layer's load in one iteration counts towards a collapse: its busiest expert at
// kCollapseMaxOverMean or more, or at least kCollapseIdleFraction of its experts idle where the
// batch gives every expert kIdleMinExpectedSlots.
struct CollapseCriterion {
  int64_t num_experts = 0;
  double expected_slots_per_expert = 0;  // global batch x sequence x top-k / experts
  static CollapseCriterion of(const ExperimentConfig& config);
  bool collapsed(const LayerLoad& load) const;
};

// The per-layer loads of one metrics.jsonl line (no idle counts in runs from before they were
// recorded: those read as 0); empty for a dense model.
std::vector<LayerLoad> layer_loads(const nlohmann::json& metrics_line);

class RoutingHealth {
 public:
  explicit RoutingHealth(const CollapseCriterion& criterion) : criterion_(criterion) {}
  // One iteration's loads, per MoE layer. Returns the collapse the first time any layer has been
  // collapsed for kCollapseIterations in a row after the first kCollapseGraceIterations (naming
  // every layer that has), nullopt before and ever after: it warns once. A healthy iteration
  // restarts that layer's count.
  std::optional<RoutingCollapse> observe(int64_t iteration, const std::vector<LayerLoad>& loads_L);
  // A resumed run: the lines its metrics.jsonl kept, fed as they were, so the count goes on where
  // the killed run left it, and a collapse that run already warned about is not warned again.
  void replay(const std::filesystem::path& metrics_file);

 private:
  CollapseCriterion criterion_;
  std::vector<int64_t> streak_L_;  // consecutive collapsed iterations so far, per MoE layer
  bool warned_ = false;
};

// The metrics.jsonl field: first_iteration, iteration, moe_layers, layers (0-based decoder layers),
// num_moe_layers, max_over_mean and idle_experts (per named layer), num_experts.
nlohmann::json routing_collapse_json(const RoutingCollapse& collapse, const ModelConfig& model);

// The warning: the layers, their loads, how long, and routing_collapse_causes.
std::string routing_collapse_message(const RoutingCollapse& collapse, const ExperimentConfig& config);

// The settings that usually cause a collapse, with this run's values (configs/quickstart.yaml).
std::string routing_collapse_causes(const ExperimentConfig& config);

}  // namespace moeforge
