// defines: LoadedConfig, load_config, resolved_config_table, resolved_config_yaml,
//          write_resolved_config
//
// YAML is parsed here, once. A config file may name a base file (`base: other.yaml`, relative to
// itself) whose keys it overrides; `--set section.key=value` overrides any key afterwards. The
// result has every derived default filled in and has passed validate_config(); the parallel
// layout is validated separately, once the world size is known (parallel/layout/layout.h).
#pragma once

#include "core/config/config.h"

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace moeforge {

struct LoadedConfig {
  ExperimentConfig config;
  std::string path;                           // the config file named by the user
  std::map<std::string, std::string> origin;  // "section.key" -> "file:line", "--set", "default", "derived"
};

// Throws UserError naming the file, line, key and fix for: a missing or unreadable file, YAML
// syntax errors, an unknown section or key (with the closest valid key), a wrong type, a missing
// required value (with ConfigUse::model_only: of the model section), a cyclic `base`, and every
// invalid value validate_config() finds.
LoadedConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {},
                         ConfigUse use = ConfigUse::training);

// The resolved config as an aligned table: key, value, where the value came from.
std::string resolved_config_table(const LoadedConfig& loaded);

// The resolved config as YAML that load_config() reads back to an identical config.
std::string resolved_config_yaml(const ExperimentConfig& config);

// Writes resolved_config_yaml() to `dir/config.yaml` (creating `dir`) and returns that path.
std::filesystem::path write_resolved_config(const ExperimentConfig& config, const std::filesystem::path& dir);

}  // namespace moeforge
