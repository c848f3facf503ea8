// defines: the `moeforge` subcommands (plan, config, version, forward, convert, train and its dry
//          run) as functions of parsed options, one file each in launch/commands/ (data, report and
//          upcycle have headers of their own).
// Each returns the process exit code; user errors propagate as UserError to main.
#pragma once

#include "core/config/config_loader.h"

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
  bool quiet = false;  // no resolved-config table
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
  bool overwrite = false;  // replace the target's iter_N, or move its tracker back
};
int run_convert(const ConvertOptions& options);

struct TrainOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string load;                   // overrides checkpoint.load
  bool dry_run = false;               // layout, plan and checks only (run_train_dry_run)
  std::optional<int64_t> world_size;  // --world-size: the world a dry run plans for
  std::string command;                // the command line, for environment.json
  bool quiet = false;                 // no resolved-config table
};
// `[mpirun -np N] moeforge train CONFIG`: the Trainer (launch/train/trainer.h); under an MPI
// launcher the world size and this rank come from MPI, and an error on one rank ends the job.
int run_train(const TrainOptions& options);

// `moeforge train CONFIG --dry-run`: the layout and plan for the world size, what every rank would
// hold, and every check the trainer makes before training (launch/train/startup_checks.h), without
// allocating the model. Non-zero exit when a check fails.
int run_train_dry_run(const LoadedConfig& loaded, std::optional<int64_t> world_size, bool quiet);

// What plan and the dry run print before their own report: the resolved-config table and a blank
// line, or nothing under --quiet or a log level above info (logging.log_level or --log-level),
// which asks for warnings and errors only. `moeforge config` prints its table regardless: the
// table is what it was asked for.
std::string config_table_unless_quiet(const LoadedConfig& loaded, bool quiet);

// The world size a command that runs no ranks plans for (plan, the dry run): --world-size, else
// parallel.world_size, else the smallest layout the config allows (PP x EP). `source` says which.
int64_t planned_world_size(std::optional<int64_t> flag, const ExperimentConfig& config, std::string* source = nullptr);

// The key reference as Markdown (docs/config.md is this output).
std::string config_keys_markdown();

}  // namespace moeforge
