#include "launch/train/routing_health.h"

#include "launch/train/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>

namespace moeforge {

CollapseCriterion CollapseCriterion::of(const ExperimentConfig& c) {
  if (!c.model.is_moe()) return {};
  const auto& t = c.training;
  const int64_t experts = *c.model.num_experts;
  const auto slots = static_cast<double>(t.global_batch_size * t.seq_length * c.model.moe_router_topk);
  return {experts, slots / static_cast<double>(experts)};
}

bool CollapseCriterion::collapsed(const LayerLoad& load) const {
  const bool many_idle = load.idle_experts > 0 &&
                         static_cast<double>(load.idle_experts) >= kCollapseIdleFraction * static_cast<double>(num_experts);
  return load.max_over_mean >= kCollapseMaxOverMean || (many_idle && expected_slots_per_expert >= kIdleMinExpectedSlots);
}

std::vector<LayerLoad> layer_loads(const nlohmann::json& line) {
  std::vector<LayerLoad> loads_L;
  const auto ratios = line.value(metric::kExpertLoadPerLayer, nlohmann::json::array());
  const auto idle = line.value(metric::kExpertIdlePerLayer, nlohmann::json::array());
  for (size_t l = 0; l < ratios.size(); ++l) {
    loads_L.push_back({ratios[l].is_number() ? ratios[l].get<double>() : 0.0,
                       l < idle.size() && idle[l].is_number_integer() ? idle[l].get<int64_t>() : 0});
  }
  return loads_L;
}

std::optional<RoutingCollapse> RoutingHealth::observe(int64_t iteration, const std::vector<LayerLoad>& loads_L) {
  streak_L_.resize(loads_L.size(), 0);
  RoutingCollapse collapse{iteration - kCollapseIterations + 1, iteration, std::ssize(loads_L), {}, {}};
  for (size_t l = 0; l < loads_L.size(); ++l) {
    const bool counted = iteration > kCollapseGraceIterations && criterion_.collapsed(loads_L[l]);
    streak_L_[l] = counted ? streak_L_[l] + 1 : 0;
    // Exactly at the threshold: a layer past it would have been reported at an earlier iteration.
    if (streak_L_[l] == kCollapseIterations) {
      collapse.moe_layers.push_back(static_cast<int64_t>(l));
      collapse.loads.push_back(loads_L[l]);
    }
  }
  if (warned_ || collapse.moe_layers.empty()) return std::nullopt;
  warned_ = true;
  return collapse;
}

void RoutingHealth::replay(const std::filesystem::path& metrics_file) {
  std::ifstream in(metrics_file);
  std::string text;
  while (std::getline(in, text)) {
    const auto line = nlohmann::json::parse(text, nullptr, false);
    if (line.is_discarded() || !line.contains(metric::kIteration)) continue;  // MetricsFile dropped such lines already
    observe(line[metric::kIteration].get<int64_t>(), layer_loads(line));
  }
}

namespace {

// The decoder layer of each MoE layer (they differ where dense layers come first or alternate).
std::vector<int64_t> decoder_layers(const std::vector<int64_t>& moe_layers, const ModelConfig& model) {
  std::vector<int64_t> moe_to_decoder;
  for (int64_t l = 0; l < model.num_layers; ++l) {
    if (model.is_moe_layer(l)) moe_to_decoder.push_back(l);
  }
  std::vector<int64_t> out;
  for (const int64_t m : moe_layers) out.push_back(m < std::ssize(moe_to_decoder) ? moe_to_decoder[static_cast<size_t>(m)] : m);
  return out;
}

}  // namespace

nlohmann::json routing_collapse_json(const RoutingCollapse& c, const ModelConfig& model) {
  nlohmann::json ratios = nlohmann::json::array(), idle = nlohmann::json::array();
  for (const auto& load : c.loads) {
    ratios.push_back(load.max_over_mean);
    idle.push_back(load.idle_experts);
  }
  return {{"first_iteration", c.first_iteration},
          {"iteration", c.iteration},
          {"moe_layers", c.moe_layers},
          {"layers", decoder_layers(c.moe_layers, model)},
          {"num_moe_layers", c.num_moe_layers},
          {"max_over_mean", ratios},
          {"idle_experts", idle},
          {"num_experts", model.num_experts.value_or(0)}};
}

std::string routing_collapse_message(const RoutingCollapse& c, const ExperimentConfig& config) {
  const auto& m = config.model;
  const auto decoder = decoder_layers(c.moe_layers, m);
  std::string where = fmt::format("MoE layer{} {} (of {})", c.moe_layers.size() > 1 ? "s" : "", fmt::join(c.moe_layers, ", "),
                                  c.num_moe_layers);
  if (decoder != c.moe_layers) where += fmt::format(", decoder layer{} {}", decoder.size() > 1 ? "s" : "", fmt::join(decoder, ", "));
  std::vector<std::string> loads;
  for (size_t i = 0; i < c.loads.size(); ++i) {
    loads.push_back(fmt::format("layer {}: busiest expert {:.2f}x the mean, {} of {} experts idle", c.moe_layers[i],
                                c.loads[i].max_over_mean, c.loads[i].idle_experts, m.num_experts.value_or(0)));
  }
  const double all_on_k = m.is_moe() ? static_cast<double>(*m.num_experts) / static_cast<double>(m.moe_router_topk) : 0.0;
  return fmt::format(
      "routing collapse: {} had the busiest expert at >= {:.0f}x the mean load or {:.0f} % of the experts idle for {} "
      "iterations in a row (iterations {}-{}); {} ({:.0f}x = every token on the same {} experts). The balancing loss need "
      "not show it. {}. This is reported once; expert_load_per_layer and expert_idle_per_layer in metrics.jsonl follow it.",
      where, kCollapseMaxOverMean, 100 * kCollapseIdleFraction, kCollapseIterations, c.first_iteration, c.iteration,
      fmt::join(loads, "; "), all_on_k, m.moe_router_topk, routing_collapse_causes(config));
}

std::string routing_collapse_causes(const ExperimentConfig& config) {
  const auto& m = config.model;
  const auto& t = config.training;
  std::vector<std::string> causes;
  if (m.moe_router_enable_expert_bias) {
    causes.push_back(fmt::format("aux-loss-free balancing too slow (model.moe_router_bias_update_rate {:g}: raise it)",
                                 m.moe_router_bias_update_rate));
  }
  causes.push_back(fmt::format(
      "a balancing loss too weak to pull tokens back (model.moe_aux_loss_coeff {:g} with moe_router_load_balancing_type {}: "
      "raise the coefficient, 0.01-0.05 train the quickstart evenly; a coefficient of 0 or the type none balance nothing)",
      m.moe_aux_loss_coeff, to_string(m.moe_router_load_balancing_type)));
  causes.push_back(fmt::format(
      "an init too small for the hidden size (model.init_method_std {:g} at hidden_size {}: Megatron's 0.02 suits widths "
      "near 2048; about 1/sqrt(hidden_size) = {:.3f} keeps tokens apart, where a small one lets Adam's first updates move "
      "every embedding the same way so that every router sees the same input)",
      m.init_method_std, m.hidden_size, 1.0 / std::sqrt(static_cast<double>(m.hidden_size))));
  causes.push_back(fmt::format("a learning rate too high early on (training.lr {:g} with {} warm-up iterations: lower it "
                               "or warm up longer)",
                               t.lr, t.lr_warmup_iters));
  return fmt::format("Usual causes, with this run's values: {}", fmt::join(causes, "; "));
}

}  // namespace moeforge
