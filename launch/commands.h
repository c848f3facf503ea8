// defines: the `moeforge` subcommands (plan, config, version, forward) as functions of parsed options.
// Each returns the process exit code; user errors propagate as UserError to main.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

struct PlanOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  std::optional<int64_t> world_size;
  bool json = false;
  bool save = false;  // write <run_dir>/config.yaml and <run_dir>/plan.json
};
int run_plan(const PlanOptions& options);

struct ConfigOptions {
  std::string config_path;  // empty with keys = true
  std::vector<std::string> overrides;
  bool yaml = false;
  bool keys = false;  // print the key reference (docs/config.md) instead
};
int run_config(const ConfigOptions& options);

int run_version();

struct ForwardOptions {
  std::string checkpoint;   // a Hugging Face checkpoint directory
  std::string tokens_path;  // JSON: a list of ids, or a list of equally long lists
  std::string out_path;     // optional: logits as safetensors
};
int run_forward(const ForwardOptions& options);

// The world size a command plans for: --world-size, else parallel.world_size, else the
// launcher's, else the smallest layout the config allows (PP x EP). `source` says which.
int64_t resolve_world_size(std::optional<int64_t> flag, std::optional<int64_t> from_config, int64_t pp, int64_t ep,
                           std::string* source = nullptr);

// The key reference as Markdown (docs/config.md is this output).
std::string config_keys_markdown();

}  // namespace moeforge
