#include "core/config/config_loader.h"

#include "core/config/config_schema.h"
#include "core/config/config_validate.h"
#include "core/files/durable_file.h"
#include "core/base/errors.h"
#include "core/files/file_names.h"
#include "core/base/text_distance.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace moeforge {

namespace fs = std::filesystem;

namespace {

// One value set by a file or an override, before it is typed.
struct RawValue {
  YAML::Node node;
  std::string origin;  // "file:line" or "--set key=value"
};
using RawValues = std::map<std::string, RawValue>;  // "section.key" -> value

std::string where(const fs::path& file, const YAML::Node& node) {
  return fmt::format("{}:{}", file.string(), node.Mark().line + 1);
}

// "did you mean ...": a correct key under the wrong section, or a misspelled key (looked for in
// its own section first, then everywhere).
std::string suggestion_for_key(const std::string& section, const std::string& key) {
  std::vector<std::string> same_section, everywhere;
  for (const auto& f : config_fields()) {
    if (f.key == key) return fmt::format(" `{}` belongs in section `{}`: did you mean `{}`?", key, f.section, f.name());
    if (f.section == section) same_section.push_back(f.key);
    everywhere.push_back(f.key);
  }
  if (auto near = closest_match(key, same_section)) return fmt::format(" Did you mean `{}.{}`?", section, *near);
  if (auto near = closest_match(key, everywhere)) {
    for (const auto& f : config_fields()) {
      if (f.key == *near) return fmt::format(" Did you mean `{}`?", f.name());
    }
  }
  return " See docs/config.md (or `moeforge config --keys`) for the valid keys.";
}

const ConfigField& field_or_fail(const std::string& section, const std::string& key, const std::string& origin) {
  if (const ConfigField* f = find_config_field(section, key)) return *f;
  fail_user("{}: unknown key `{}.{}`.{}", origin, section, key, suggestion_for_key(section, key));
}

// YAML forbids a key twice in one mapping, but yaml-cpp keeps both and `node[key]` reads the
// first: a config would silently ignore the line a user edited last.
// Aliases make a YAML file a graph: one that contains itself (`a: &x [*x]`) has no end, and nested
// aliases expand exponentially ("billion laughs": 600 bytes, 10^9 nodes). A config is a tree of at
// most kMaxConfigNodes nodes once expanded; anything else is refused before any walk of it.
constexpr int64_t kMaxConfigNodes = 100000;

void refuse_unbounded_aliases(const YAML::Node& node, const std::string& origin, std::vector<YAML::Node>& ancestors,
                              int64_t& visited) {
  if (++visited > kMaxConfigNodes) {
    fail_user("{}: the YAML expands to more than {} values through its aliases (&name / *name); a config needs "
              "far fewer. Write the values out instead of nesting aliases.",
              origin, kMaxConfigNodes);
  }
  if (!node.IsSequence() && !node.IsMap()) return;
  for (const auto& a : ancestors) {
    if (a.is(node)) {
      fail_user("{}:{}: an alias refers to a list or mapping that contains it, so the value never ends. Remove "
                "the self-reference.",
                origin, node.Mark().line + 1);
    }
  }
  ancestors.push_back(node);
  if (node.IsSequence()) {
    for (const auto& item : node) refuse_unbounded_aliases(item, origin, ancestors, visited);
  } else {
    for (const auto& kv : node) {
      refuse_unbounded_aliases(kv.first, origin, ancestors, visited);
      refuse_unbounded_aliases(kv.second, origin, ancestors, visited);
    }
  }
  ancestors.pop_back();
}

void refuse_unbounded_aliases(const YAML::Node& root, const std::string& origin) {
  std::vector<YAML::Node> ancestors;
  int64_t visited = 0;
  refuse_unbounded_aliases(root, origin, ancestors, visited);
}

void refuse_duplicate_keys(const YAML::Node& node, const fs::path& file, const std::string& prefix) {
  if (node.IsSequence()) {
    for (const auto& item : node) refuse_duplicate_keys(item, file, prefix);
    return;
  }
  if (!node.IsMap()) return;
  std::map<std::string, int> first_line;
  for (const auto& kv : node) {
    const int line = kv.first.Mark().line + 1;
    if (!kv.first.IsScalar()) {  // `? [a, b]: 1` is valid YAML, but no config key
      fail_user("{}:{}: a key must be a plain name, not a {}.", file.string(), line,
                kv.first.IsSequence() ? "list" : kv.first.IsMap() ? "mapping" : "null");
    }
    const std::string key = kv.first.Scalar();
    const std::string name = prefix.empty() ? key : prefix + "." + key;
    if (const auto [at, fresh] = first_line.emplace(key, line); !fresh) {
      fail_user("{}:{}: `{}` appears twice (first at line {}). Remove one of the two lines.", file.string(), line, name,
                at->second);
    }
    refuse_duplicate_keys(kv.second, file, name);
  }
}

// Where `file` names (a base chain compares these), or a UserError for a path the system cannot
// resolve (a name over the file system's length limit, say).
fs::path resolved(const fs::path& file, const std::vector<fs::path>& chain) {
  std::error_code ec;
  fs::path canonical = fs::weakly_canonical(file, ec);
  if (ec) {
    const std::string named_by = chain.empty() ? "" : fmt::format(" (the `base:` of {})", chain.back().string());
    fail_user("cannot resolve config path {}{}: {}. Check the path.", file.string(), named_by, ec.message());
  }
  return canonical;
}

void collect_file(const fs::path& file, RawValues& out, std::vector<fs::path>& chain) {
  const fs::path canonical = resolved(file, chain);
  if (std::find(chain.begin(), chain.end(), canonical) != chain.end()) {
    std::string cycle;
    for (const auto& p : chain) cycle += p.string() + " -> ";
    fail_user("config `base` chain is cyclic: {}{}. Remove one of the `base:` lines.", cycle, canonical.string());
  }
  if (!fs::exists(file)) {
    if (chain.empty()) fail_user("config file not found: {}. Check the path (configs/ holds the shipped configs).", file.string());
    fail_user("config file not found: {} (the `base:` of {}). Paths in `base:` are relative to the file that names them.",
              file.string(), chain.back().string());
  }
  if (fs::is_directory(file)) {
    fail_user("{} is a directory, not a config file. Name a YAML file (configs/ holds the shipped configs).", file.string());
  }
  YAML::Node root;
  try {
    root = YAML::LoadFile(file.string());
  } catch (const YAML::ParserException& e) {
    fail_user("{}:{}:{}: YAML syntax error: {}", file.string(), e.mark.line + 1, e.mark.column + 1, e.msg);
  } catch (const YAML::BadFile&) {
    fail_user("cannot read config file {}: check its permissions.", file.string());
  }
  refuse_unbounded_aliases(root, file.string());
  if (root.IsNull()) fail_user("{}: the config is empty; it needs at least the model and training sections.", file.string());
  if (!root.IsMap()) fail_user("{}: a config must be a mapping of sections (model:, training:, ...), not {}.", file.string(),
                               root.IsSequence() ? "a list" : "a single value");

  refuse_duplicate_keys(root, file, "");
  chain.push_back(canonical);
  if (const YAML::Node base = root["base"]) {
    if (!base.IsScalar()) fail_user("{}: `base` must be a file name, got {}.", where(file, base), base.IsSequence() ? "a list" : "a mapping");
    collect_file(file.parent_path() / base.Scalar(), out, chain);
  }
  chain.pop_back();

  for (const auto& item : root) {
    const std::string section = item.first.as<std::string>();
    if (section == "base") continue;
    const auto& sections = config_sections();
    if (std::find(sections.begin(), sections.end(), section) == sections.end()) {
      std::string hint;
      for (const auto& f : config_fields()) {
        if (f.key == section) hint = fmt::format(" `{}` is a key: write it under `{}:`.", section, f.section);
      }
      if (hint.empty()) {
        auto near = closest_match(section, sections);
        hint = near ? fmt::format(" Did you mean `{}`?", *near) : fmt::format(" Valid sections: {}.", fmt::join(sections, ", "));
      }
      fail_user("{}: unknown section `{}`.{}", where(file, item.first), section, hint);
    }
    if (item.second.IsNull()) continue;  // an empty section
    if (!item.second.IsMap()) fail_user("{}: section `{}` must be a mapping of keys.", where(file, item.second), section);
    for (const auto& kv : item.second) {
      const std::string key = kv.first.as<std::string>();
      const std::string origin = where(file, kv.first);
      field_or_fail(section, key, origin);
      out[section + "." + key] = RawValue{kv.second, origin};
    }
  }
}

void collect_override(const std::string& assignment, RawValues& out) {
  const std::string origin = fmt::format("--set {}", assignment);
  const size_t eq = assignment.find('=');
  const size_t dot = assignment.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot > eq) {
    fail_user("{}: expected section.key=value, e.g. --set training.lr=3e-4", origin);
  }
  const std::string section = assignment.substr(0, dot);
  const std::string key = assignment.substr(dot + 1, eq - dot - 1);
  field_or_fail(section, key, origin);
  // `--set checkpoint.save=` means the empty string (as `key: ""` would), not YAML's null.
  const std::string text = assignment.substr(eq + 1);
  YAML::Node value(std::string{});
  try {
    if (!text.empty()) value = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    fail_user("{}: the value is not valid YAML: {}", origin, e.msg);
  }
  refuse_unbounded_aliases(value, origin);
  out[section + "." + key] = RawValue{value, origin};
}

}  // namespace

LoadedConfig load_config(const std::string& path, const std::vector<std::string>& overrides, ConfigUse use) {
  RawValues raw;
  std::vector<fs::path> chain;
  collect_file(path, raw, chain);
  for (const auto& o : overrides) collect_override(o, raw);

  LoadedConfig loaded;
  loaded.path = path;
  std::vector<std::string> missing;
  for (const auto& field : config_fields()) {
    const std::string name = field.name();
    auto it = raw.find(name);
    if (it == raw.end()) {
      if (field.required && (use == ConfigUse::training || field.section == "model")) missing.push_back(fmt::format("  {}: {} ({})", name, field.doc, field.type));
      loaded.origin[name] = "default";
      continue;
    }
    const RawValue& value = it->second;
    if (field.required && value.node.IsNull()) {
      fail_user("{}: `{}` is required and cannot be null ({}; {}).", value.origin, name, field.doc, field.type);
    }
    try {
      field.assign(loaded.config, value.node);
    } catch (const std::invalid_argument& e) {
      fail_user("{}: wrong type for `{}`: {}. It takes {} ({}).", value.origin, name, e.what(), field.type, field.doc);
    }
    loaded.origin[name] = value.origin;
  }
  if (!missing.empty()) {
    fail_user("{}: missing required value{}:\n{}\nAdd {} to the config (or its base), or pass --set section.key=value.",
              path, missing.size() > 1 ? "s" : "", fmt::join(missing, "\n"), missing.size() > 1 ? "them" : "it");
  }
  resolve_derived_values(loaded.config, path, loaded.origin);
  validate_config(loaded.config, use);
  return loaded;
}

std::string resolved_config_table(const LoadedConfig& loaded) {
  size_t key_width = 0, value_width = 0;
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto& f : config_fields()) {
    rows.emplace_back(f.name(), format_field_value(f, loaded.config));
    key_width = std::max(key_width, rows.back().first.size());
    value_width = std::max(value_width, std::min<size_t>(rows.back().second.size(), 48));
  }
  std::ostringstream out;
  out << fmt::format("resolved config ({})\n", loaded.path);
  out << fmt::format("  {:<{}}  {:<{}}  {}\n", "key", key_width, "value", value_width, "from");
  out << fmt::format("  {:-<{}}  {:-<{}}  {:-<4}\n", "", key_width, "", value_width, "");
  for (const auto& [name, value] : rows) {
    auto it = loaded.origin.find(name);
    out << fmt::format("  {:<{}}  {:<{}}  {}\n", name, key_width, value, value_width,
                       it == loaded.origin.end() ? "default" : it->second);
  }
  return out.str();
}

std::string resolved_config_yaml(const ExperimentConfig& config) {
  YAML::Node root(YAML::NodeType::Map);
  for (const auto& f : config_fields()) root[f.section][f.key] = f.to_yaml(config);
  YAML::Emitter out;  // numbers are already their shortest round-trip text (config_schema.cpp)
  out << root;
  return std::string("# Resolved moeforge config: every key, derived values filled in.\n") + out.c_str() + "\n";
}

fs::path write_resolved_config(const ExperimentConfig& config, const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail_user("cannot create run directory {}: {}. Set logging.run_dir to a writable path.", dir.string(), ec.message());
  const fs::path path = dir / files::kResolvedConfig;
  write_file_durably(path, resolved_config_yaml(config));
  return path;
}

}  // namespace moeforge
