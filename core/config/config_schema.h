// defines: ConfigField, config_fields, find_config_field
//
// The one table that binds every YAML key (`section.key`) to its typed field in ExperimentConfig,
// with its type, documentation and whether it is required. The loader, the resolved-config table,
// the YAML writer and the key reference (docs/config.md) are all driven by it, so a key exists in
// exactly one place.
#pragma once

#include "core/config/config.h"

#include <yaml-cpp/yaml.h>

#include <functional>
#include <string>
#include <vector>

namespace moeforge {

struct ConfigField {
  std::string section;
  std::string key;
  std::string type;  // human-readable: "integer", "one of {linear, cosine}", ...
  std::string doc;
  bool required = false;
  // Parses `node` into the field; throws std::invalid_argument("expected ..., got ...").
  std::function<void(ExperimentConfig&, const YAML::Node&)> assign;
  std::function<YAML::Node(const ExperimentConfig&)> to_yaml;  // Null for an absent optional

  std::string name() const { return section + "." + key; }
};

const std::vector<ConfigField>& config_fields();
const std::vector<std::string>& config_sections();
const ConfigField* find_config_field(const std::string& section, const std::string& key);

// A value as one line of text (flow-style YAML, `null` for absent optionals).
std::string format_field_value(const ConfigField& field, const ExperimentConfig& config);

}  // namespace moeforge
