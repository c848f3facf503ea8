// The `moeforge` executable: one binary, one subcommand per job (launch/commands/); this file only
// wires the command line to them. main() owns error reporting: user errors print their message
// and exit 1 with no stack dump; anything else is a bug and exits 3.
#include "core/config/config.h"
#include "core/base/errors.h"
#include "core/config/logging.h"
#include "launch/commands/check_command.h"
#include "launch/commands/commands.h"
#include "launch/commands/data_commands.h"
#include "launch/commands/hang_command.h"
#include "launch/commands/report.h"
#include "launch/commands/upcycle_command.h"
#include "launch/train/run_environment.h"
#include "parallel/comm/async_error.h"

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <csignal>
#include <iostream>
#include <map>

namespace {

// CLI11's PositiveNumber says "not in range 0 to 1.79e308"; this says what is wanted.
const CLI::Validator kPositiveWhole(
    [](std::string& text) -> std::string {
      size_t used = 0;
      long long v = 0;
      try {
        v = std::stoll(text, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      return used == text.size() && v >= 1 ? "" : "must be a whole number of at least 1, got " + text;
    },
    "POSITIVE");

int run(int argc, char** argv) {
  CLI::App app{"moeforge: Megatron-style distributed pretraining for Mixture-of-Experts models"};
  app.require_subcommand(1);
  std::string level_name = "info";
  std::vector<std::string> level_names;
  for (const auto& [value, name] : moeforge::enum_names<moeforge::LogLevel>()) level_names.emplace_back(name);
  app.add_option("--log-level", level_name, "Log verbosity")->check(CLI::IsMember(level_names));
  bool quiet = false;
  app.add_flag("--quiet", quiet,
               "Leave out the resolved-config table that plan and train (and its dry run) print first "
               "(as does a log level above info)");
  // Global options may also follow the subcommand (`moeforge plan CONFIG --quiet`).
  app.fallthrough();

  moeforge::PlanOptions plan;
  auto* plan_cmd = app.add_subcommand("plan", "Parameters, FLOPs, batch arithmetic, bubble and memory per rank for a config");
  plan_cmd->add_option("config", plan.config_path, "Experiment YAML")->required();
  plan_cmd->add_option("--world-size", plan.world_size, "Ranks to plan for (default: parallel.world_size, the launcher's, or PP x EP)")
      ->check(kPositiveWhole);
  plan_cmd->add_option("--set", plan.overrides, "Override a key: section.key=value (repeatable)");
  plan_cmd->add_flag("--json", plan.json, "Print one JSON object (keys in docs/plan.md)");
  plan_cmd->add_flag("--save", plan.save, "Also write config.yaml and plan.json into the run directory (logging.run_dir)");

  moeforge::ConfigOptions config;
  auto* config_cmd = app.add_subcommand("config", "Print the resolved config (table or YAML), or the key reference");
  auto* config_path = config_cmd->add_option("config", config.config_path, "Experiment YAML");
  config_cmd->add_option("--set", config.overrides, "Override a key: section.key=value (repeatable)");
  config_cmd->add_flag("--yaml", config.yaml, "Print YAML that loads back to the same config");
  auto* keys = config_cmd->add_flag("--keys", config.keys, "Print every key with type, default and meaning (Markdown)");
  keys->excludes(config_path);
  config_cmd->callback([&] {
    if (!config.keys && config.config_path.empty()) throw CLI::RequiredError("config (or --keys)");
  });

  auto* version_cmd = app.add_subcommand("version", "Versions of moeforge and its libraries, GPUs visible");

  moeforge::ForwardOptions forward;
  auto* forward_cmd = app.add_subcommand("forward", "Run a Hugging Face checkpoint on token ids: loss and logits");
  forward_cmd->add_option("--checkpoint", forward.checkpoint, "Checkpoint directory (config.json + *.safetensors)")->required();
  forward_cmd->add_option("--tokens", forward.tokens_path, "JSON list of token ids (or list of equal-length lists)")->required();
  forward_cmd->add_option("--out", forward.out_path, "Write the logits here (safetensors, tensor \"logits\")");

  moeforge::TrainOptions train;
  auto* train_cmd = app.add_subcommand("train", "Train a model from a config: MFU every step, metrics.jsonl, checkpoints");
  train_cmd->add_option("config", train.config_path, "Experiment YAML")->required();
  train_cmd->add_option("--set", train.overrides, "Override a key: section.key=value (repeatable)");
  train_cmd->add_option("--load", train.load,
                        "Resume from a save directory or iter_* checkpoint, or start from a Hugging Face checkpoint's "
                        "weights (overrides checkpoint.load)");
  train_cmd->add_flag("--dry-run", train.dry_run,
                      "Build the layout and plan, show what every rank would hold and run the start-up checks; "
                      "allocate and write nothing");
  train_cmd->add_option("--world-size", train.world_size,
                        "With --dry-run: ranks to plan for (default: parallel.world_size, the launcher's, or PP x EP)")
      ->check(kPositiveWhole);

  moeforge::ConvertOptions convert;
  auto* convert_cmd = app.add_subcommand(
      "convert", "Rewrite a training checkpoint as a whole one, or sharded for another pipeline x expert layout");
  convert_cmd->add_option("source", convert.source, "Save directory or iter_* checkpoint (whole or sharded)")->required();
  convert_cmd->add_option("target", convert.target, "Save directory to write the converted checkpoint into")->required();
  convert_cmd->add_option("--format", convert.format, "whole (any layout resumes it) or sharded (per stage and EP rank)")
      ->check(CLI::IsMember({"whole", "sharded"}));
  convert_cmd->add_option("--set", convert.overrides,
                          "Override a key of the checkpoint's config, e.g. parallel.pipeline_model_parallel_size=2 "
                          "(repeatable)");
  convert_cmd->add_flag("--overwrite", convert.overwrite,
                        "Replace an iter_* the target already holds, or move its tracker back to this iteration");

  moeforge::UpcycleCommandOptions up;
  std::string up_method = "copy", up_split = "contiguous", up_shared = "dense";
  double up_scale = 0;
  auto* up_cmd = app.add_subcommand("upcycle", "Build an MoE Hugging Face checkpoint from a dense one (docs/upcycling.md)");
  up_cmd->add_option("--from", up.from, "Dense Hugging Face checkpoint (qwen2 / Qwen1.5 or llama)")->required();
  up_cmd->add_option("--to", up.to, "Output directory (a Hugging Face checkpoint plus upcycle.json)")->required();
  up_cmd->add_option("--config", up.config_path, "Experiment YAML whose model section is the MoE to build")->required();
  up_cmd->add_option("--set", up.overrides, "Override a config key: section.key=value (repeatable)");
  up_cmd->add_option("--method", up_method, "copy, split, granular or fine_grained")
      ->check(CLI::IsMember({"copy", "split", "granular", "fine_grained"}));
  up_cmd->add_option("--seed", up.upcycle.seed, "Seed of every random choice (partition, shuffles, random rows, router)");
  up_cmd->add_option("--split-order", up_split, "split: contiguous blocks or a random partition of the neurons")
      ->check(CLI::IsMember({"contiguous", "random"}));
  up_cmd->add_option("--granularity", up.upcycle.granularity, "granular: shards per copy (G)")->check(kPositiveWhole);
  auto* scale_opt = up_cmd->add_option("--scale", up_scale, "Expert output scale (multiplies down_proj); default 1, granular G");
  up_cmd->add_option("--reinit-fraction", up.upcycle.reinit_fraction, "fine_grained: share of each expert's neurons drawn anew");
  up_cmd->add_option("--shared-init", up_shared, "Shared expert from the dense FFN's first neurons, or random")
      ->check(CLI::IsMember({"dense", "random"}));
  up_cmd->add_option("--router-std", up.upcycle.router_std, "Random router: normal(0, std)");
  up_cmd->add_option("--router-from", up.upcycle.router_from, "Warm boot: copy the routers of this MoE checkpoint");
  up_cmd->add_flag("--verify", up.verify, "Check the method's invariants against the dense model on sample tokens");
  up_cmd->add_flag("--overwrite", up.overwrite,
                   "Replace a --to directory that is not empty (swapped in whole once the new checkpoint is complete)");

  moeforge::ReportOptions report;
  auto* report_cmd = app.add_subcommand("report", "Benchmark report of a run: FlagPerf's row, MFU, accuracy verdict, plots (docs/report.md)");
  std::vector<std::string> report_runs;
  report_cmd->add_option("run_dir", report_runs,
                         "The run's directory (logging.run_dir); several: one report each plus a comparison of them")
      ->required();
  report_cmd->add_option("--reference", report.reference,
                         "Reference loss curve: a run directory, its metrics.jsonl, or a Megatron-LM log");
  report_cmd->add_option("--out", report.out_dir,
                         "Where report.json/.md/.html go (default RUN_DIR/report); with several runs, DIR/<run>/ and "
                         "DIR/comparison.* (default: reports)");
  report_cmd->add_option("--warmup", report.warmup, "Iterations left out of the steady state (default: n/10, 1..10)")
      ->check(CLI::NonNegativeNumber);
  report_cmd->add_option("--from-iteration", report.from_iteration, "Compare losses from this iteration on (FlagPerf: 21)");
  report_cmd->add_option("--threshold", report.threshold, "Pass when the mean relative loss error is below this (FlagPerf: 0.02)");

  auto* check_cmd = app.add_subcommand(
      "check", "Checks: this machine's fused kernels against their references (docs/kernels.md), a hung run's flight recorders (docs/hang.md)");
  check_cmd->require_subcommand(1);
  moeforge::CheckKernelsOptions check_kernels;
  auto* check_kernels_cmd = moeforge::add_check_kernels_command(*check_cmd, check_kernels);
  std::string hang_run_dir;
  auto* hang_cmd = check_cmd->add_subcommand(
      "hang", "Compare the ranks' flight recorders of a run that hung: the first call they differ at (docs/hang.md)");
  hang_cmd->add_option("run_dir", hang_run_dir, "The run's directory (logging.run_dir), holding hang/rank_N.json")->required();

  auto* data_cmd = app.add_subcommand("data", "Megatron datasets: inspect, samples, merge, preprocess");
  data_cmd->require_subcommand(1);
  moeforge::DataInspectOptions inspect;
  auto* inspect_cmd = data_cmd->add_subcommand("inspect", "Validate a dataset and print its statistics");
  inspect_cmd->add_option("prefix", inspect.prefix, "Dataset prefix (PREFIX.bin / PREFIX.idx)")->required();
  inspect_cmd->add_flag("--json", inspect.json, "Print one JSON object");
  moeforge::DataSamplesOptions samples;
  auto* samples_cmd = data_cmd->add_subcommand("samples", "Token ids of samples exactly as the trainer receives them");
  samples_cmd->add_option("config", samples.config_path, "Experiment YAML")->required();
  samples_cmd->add_option("--split", samples.split, "train, valid or test")->check(CLI::IsMember({"train", "valid", "test"}));
  samples_cmd->add_option("--first", samples.first, "How many samples, from global sample 0")->check(CLI::NonNegativeNumber);
  samples_cmd->add_option("--set", samples.overrides, "Override a key: section.key=value (repeatable)");
  samples_cmd->add_flag("--json", samples.json, "Print JSON (tokens, labels, loss_mask, position_ids)");
  samples_cmd->add_option("--decode", samples.decode,
                          "Also print each sample's text, decoded by this tokenizer (tokenizer.json or \"byte\")");
  moeforge::DataMergeOptions merge;
  auto* merge_cmd = data_cmd->add_subcommand("merge", "Concatenate datasets of one dtype into one (Megatron's merge_datasets)");
  merge_cmd->add_option("--input", merge.inputs, "Dataset prefixes, in order")->required();
  merge_cmd->add_option("--output-prefix", merge.output_prefix, "Prefix of the merged dataset")->required();
  moeforge::data::PreprocessOptions pre;
  auto* pre_cmd = data_cmd->add_subcommand("preprocess", "JSON lines -> Megatron dataset <prefix>_<key>_document (as preprocess_data.py)");
  pre_cmd->add_option("--input", pre.input, "JSON lines file, one document per line")->required();
  pre_cmd->add_option("--json-key", pre.json_key, "Key holding the text");
  pre_cmd->add_option("--tokenizer", pre.tokenizer, "Hugging Face tokenizer.json, or \"byte\"")->required();
  pre_cmd->add_option("--output-prefix", pre.output_prefix, "Output prefix; files are <prefix>_<key>_document.{bin,idx}")->required();
  pre_cmd->add_flag("--append-eod", pre.append_eod, "End every non-empty document with the tokenizer's EOD id");
  pre_cmd->add_option("--workers", pre.workers, "Tokenizing threads (default: all cores)")->check(CLI::NonNegativeNumber);
  pre_cmd->add_flag("--skip-bad-lines", pre.skip_bad_lines, "Skip and report bad lines instead of failing on the first");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; every bad command line is a user error: exit 1, as documented.
    return app.exit(e) == 0 ? 0 : 1;
  }
  moeforge::LogLevel level = moeforge::LogLevel::info;
  for (const auto& [value, name] : moeforge::enum_names<moeforge::LogLevel>()) {
    if (name == level_name) level = value;
  }
  moeforge::init_logging(0, level);  // `train` re-tags the lines with MPI's rank under a launcher
  // --log-level is an override of logging.log_level, so the config's level applies otherwise.
  if (app.get_option("--log-level")->count() > 0) {
    plan.overrides.push_back("logging.log_level=" + level_name);
    config.overrides.push_back("logging.log_level=" + level_name);
    samples.overrides.push_back("logging.log_level=" + level_name);
    train.overrides.push_back("logging.log_level=" + level_name);
  }
  plan.quiet = train.quiet = quiet;
  if (*plan_cmd) return moeforge::run_plan(plan);
  if (*config_cmd) return moeforge::run_config(config);
  if (*version_cmd) return moeforge::run_version();
  if (*train_cmd) {
    train.command = moeforge::shell_command_line(argc, argv);
    return moeforge::run_train(train);
  }
  if (*forward_cmd) return moeforge::run_forward(forward);
  if (*convert_cmd) return moeforge::run_convert(convert);
  if (*report_cmd) return moeforge::run_reports(report, report_runs);
  if (*up_cmd) {
    static const std::map<std::string, moeforge::moe::UpcycleMethod> methods{
        {"copy", moeforge::moe::UpcycleMethod::copy},
        {"split", moeforge::moe::UpcycleMethod::split},
        {"granular", moeforge::moe::UpcycleMethod::granular},
        {"fine_grained", moeforge::moe::UpcycleMethod::fine_grained}};
    up.upcycle.method = methods.at(up_method);
    up.upcycle.random_split = up_split == "random";
    up.upcycle.shared_init = up_shared == "dense" ? moeforge::moe::SharedExpertInit::dense : moeforge::moe::SharedExpertInit::random;
    if (scale_opt->count() > 0) up.upcycle.scale = up_scale;
    return moeforge::run_upcycle(up);
  }
  if (*hang_cmd) return moeforge::run_check_hang(hang_run_dir);
  if (*check_kernels_cmd) return moeforge::run_check_kernels(check_kernels, std::cout);
  if (*inspect_cmd) return moeforge::run_data_inspect(inspect);
  if (*samples_cmd) return moeforge::run_data_samples(samples);
  if (*merge_cmd) return moeforge::run_data_merge(merge);
  if (*pre_cmd) return moeforge::run_data_preprocess(pre);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f) then fails the write with EFBIG, which is reported as a user
  // error naming the file, instead of killing the process without a word.
  std::signal(SIGXFSZ, SIG_IGN);
  try {
    return run(argc, argv);
  } catch (const moeforge::UserError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const moeforge::CommError& e) {  // a peer or the network failed: neither the user's nor a bug
    std::cerr << "error: " << e.what() << "\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "internal error (a bug in moeforge, please report it): " << e.what() << "\n";
    return 3;
  }
}
