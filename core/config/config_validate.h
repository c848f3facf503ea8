// defines: resolve_derived_values, validate_config, ModelKeyName, model_config_problems,
//          kMaxModelLayers
#pragma once

#include "core/config/config.h"

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge {

// Fills every "derived when absent" field (see core/config/config.h) and records "derived" as its origin.
// `config_path` names the default run directory (runs/<config file stem>).
void resolve_derived_values(ExperimentConfig& config, const std::string& config_path,
                            std::map<std::string, std::string>& origin);

// Checks every value and every relation between values that does not depend on the parallel
// layout (with ConfigUse::model_only, the model section's). Throws one UserError listing all
// problems found.
void validate_config(const ExperimentConfig& config, ConfigUse use = ConfigUse::training);

// The most layers a model may have. Far above any published model (about 128), and low enough
// that loops over the layers (the MoE layer pattern, a checkpoint's tensor names) stay short.
// Readers that loop over num_layers before validating check it first.
constexpr int64_t kMaxModelLayers = int64_t{1} << 16;

// The name a model setting has in the file it was read from, given ModelConfig's member name
// ("num_layers"): `model.num_layers` in the YAML config, `num_hidden_layers` in a Hugging Face
// config.json. Messages name what the user wrote.
using ModelKeyName = std::function<std::string(std::string_view field)>;

// Every problem of the model settings alone (each value's range and the relations between them),
// one line each, keys named by `key`; empty when the model is valid. The YAML config
// (validate_config) and a Hugging Face config.json (moe/hf_config.h) are held to these same rules.
// Expects resolve_derived_values' fields filled where it could fill them.
std::vector<std::string> model_config_problems(const ModelConfig& model, const ModelKeyName& key);

}  // namespace moeforge
