// defines: the `moeforge` subcommands (plan, config, version, forward, convert, train --dry-run) as
//          functions of parsed options.
// Each returns the process exit code; user errors propagate as UserError to main.
#pragma once

#include "core/config_loader.h"

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

struct ConvertOptions {
  std::string source;  // a save directory or an iter_* training checkpoint (whole or sharded)
  std::string target;  // the save directory to write the converted checkpoint into
  std::string format = "whole";        // whole | sharded
  std::vector<std::string> overrides;  // applied to the checkpoint's config.yaml: the target layout
};
int run_convert(const ConvertOptions& options);

// `moeforge train CONFIG --dry-run`: the layout and plan for the world size, what every rank would
// hold, and the checks a run makes before training (data, checkpoint to resume and its layout),
// without allocating the model. Non-zero exit when a check fails.
int run_train_dry_run(const LoadedConfig& loaded, std::optional<int64_t> world_size);

// The world size a command plans for: --world-size, else parallel.world_size, else the
// launcher's, else the smallest layout the config allows (PP x EP). `source` says which.
int64_t resolve_world_size(std::optional<int64_t> flag, std::optional<int64_t> from_config, int64_t pp, int64_t ep,
                           std::string* source = nullptr);

// The key reference as Markdown (docs/config.md is this output).
std::string config_keys_markdown();

}  // namespace moeforge
