// defines: resolve_derived_values, validate_config
#pragma once

#include "core/config/config.h"

#include <map>
#include <string>

namespace moeforge {

// Fills every "derived when absent" field (see core/config/config.h) and records "derived" as its origin.
// `config_path` names the default run directory (runs/<config file stem>).
void resolve_derived_values(ExperimentConfig& config, const std::string& config_path,
                            std::map<std::string, std::string>& origin);

// Checks every value and every relation between values that does not depend on the parallel
// layout (with ConfigUse::model_only, the model section's). Throws one UserError listing all
// problems found.
void validate_config(const ExperimentConfig& config, ConfigUse use = ConfigUse::training);

}  // namespace moeforge
