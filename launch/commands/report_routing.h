// defines: ep_compute_spread, expert_loads_summary, routing_comparison, add_routing_comparison,
//          render_routing_markdown,
//          render_routing_html, expert_load_histograms_html, loss_overlay_html
//
// Natural against forced routing in `moeforge report` (docs/report.md, "Both routings"): what the
// EP ranks waited for the busiest one in each step, the tokens each expert received
// (expert_loads.jsonl), and, comparing a natural and a forced run of one case, the straggler's
// cost: the natural run's median step time minus the forced run's, split into that wait and the
// rest.
#pragma once

#include "parallel/layout/layout.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace moeforge {

// Per steady step (metrics[warmup..]), over each EP group's ranks of rank_times'
// compute_before_all_to_all_s: max - mean, the largest over the groups; their median. Null
// (with why) when the run has no such values (one EP rank, or a run from before them).
nlohmann::json ep_compute_spread(const std::vector<nlohmann::json>& metrics, int64_t warmup, const ParallelLayout& layout);

// <run_dir>/expert_loads.jsonl summed over its lines at or after `first_iteration` (all lines when
// none is): {"iterations": [...], "tokens_per_expert": [[per expert] per MoE layer]}; null when the
// file is absent. UserError naming the file and line when a line does not parse.
nlohmann::json expert_loads_summary(const std::filesystem::path& run_dir, int64_t first_iteration);

// Each report's routing ("natural" or "forced"), and when the runs hold one of each, the
// straggler's cost (comparison.json's "routing" and "straggler_cost").
nlohmann::json routing_comparison(const std::vector<nlohmann::json>& reports);
// Into a comparison: each row's routing and step time, the title, "routing", "straggler_cost" and
// "loss_curves" (every run's LM loss by iteration).
void add_routing_comparison(nlohmann::json& comparison, const std::vector<nlohmann::json>& reports);

// The comparison's routing section: which run is which and the straggler's cost.
std::string render_routing_markdown(const nlohmann::json& comparison);
std::string render_routing_html(const nlohmann::json& comparison);
// The comparison's runs' loss curves on one chart (comparison.json's loss_curves).
std::string loss_overlay_html(const nlohmann::json& comparison);
// A run report's histograms of tokens per expert, one small chart per MoE layer.
std::string expert_load_histograms_html(const nlohmann::json& report);

}  // namespace moeforge
