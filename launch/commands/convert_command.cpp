// `moeforge convert SRC DST --format whole|sharded [--set parallel.KEY=VALUE ...]`: rewrites a
// training checkpoint (whole or sharded) as a whole checkpoint or as the shards of another
// pipeline x expert-parallel layout, in a new save directory `--load` resumes from. Everything is
// read and checked before anything is written, and the write is as atomic as a training save.
#include "launch/commands/commands.h"

#include "core/config/config_loader.h"
#include "core/files/dir_lock.h"
#include "core/base/errors.h"
#include "launch/train/sharded_checkpoint.h"
#include "launch/train/checkpoint.h"
#include "moe/hf_checkpoint.h"
#include "parallel/parallelize.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

namespace fs = std::filesystem;

namespace moeforge {

namespace {

// A whole checkpoint's model (our names, stored dtype) and optimizer state.
CheckpointContents read_whole(const std::string& dir, const ModelConfig& config, bool bf16) {
  CheckpointContents out;
  auto hf = moe::load_hf_checkpoint(dir, bf16 ? torch::kBFloat16 : torch::kFloat32);
  // The routing is no tensor: config.yaml states it (the config.json of checkpoints written before
  // moeforge's routing keys misstated Megatron's default), and the new config.json is written from it.
  hf.config.moe_router_pre_softmax = config.moe_router_pre_softmax;
  hf.config.moe_router_norm_topk_prob = config.moe_router_norm_topk_prob;
  const auto diffs = model_config_differences(hf.config, config);
  if (!diffs.empty()) {
    fail_user("{}: config.json and config.yaml describe different models:\n  - {}\nThe checkpoint is inconsistent.", dir,
              fmt::join(diffs, "\n  - "));
  }
  for (const auto& item : hf.model->named_parameters()) out.model.emplace_back(item.key(), item.value().detach());
  const SafetensorsFile opt((fs::path(dir) / files::kOptimizer).string());
  for (const auto& name : opt.names()) {
    if (name == files::kRngTensor) {
      out.rng = opt.tensor_exactly(name, torch::kUInt8);
    } else {
      out.optimizer.emplace_back(name, opt.tensor_exactly(name, torch::kFloat32));
    }
  }
  return out;
}

// Every optimizer tensor belongs to a model parameter of its shape: optimizer state that matches
// nothing would be dropped by the run that loads it.
void check_optimizer_names(const CheckpointContents& c, const std::string& source) {
  std::map<std::string, std::vector<int64_t>> params;
  for (const auto& [name, t] : c.model) params[name] = {t.sizes().begin(), t.sizes().end()};
  std::vector<std::string> problems;
  for (const auto& [name, t] : c.optimizer) {
    const std::string parameter(optimizer_state_parameter(name));
    const auto it = params.find(parameter);
    if (parameter == name || it == params.end()) {
      problems.push_back(fmt::format("{}: not the state of any model parameter", name));
    } else if (it->second != std::vector<int64_t>(t.sizes().begin(), t.sizes().end())) {
      problems.push_back(fmt::format("{}: shape [{}], parameter [{}]", name, fmt::join(t.sizes(), ", "),
                                     fmt::join(it->second, ", ")));
    }
  }
  if (!problems.empty()) {
    fail_user("{}: optimizer state does not match the model ({} problem{}):\n  - {}\nNothing was converted.", source,
              problems.size(), problems.size() > 1 ? "s" : "", fmt::join(problems, "\n  - "));
  }
}

int64_t elements(const NamedTensors& tensors) {
  int64_t n = 0;
  for (const auto& [name, t] : tensors) n += t.numel();
  return n;
}

// A converted checkpoint must not replace one the target already holds, nor move its tracker back
// (a run resuming the target would lose its newer iterations).
void refuse_to_replace(const fs::path& target, int64_t iteration) {
  const fs::path existing = target / files::iteration_dir(iteration);
  if (fs::exists(existing)) {
    fail_user("{} already holds {}: convert would replace it. Write into another directory, or pass --overwrite to "
              "replace it.", target.string(), existing.string());
  }
  const fs::path tracker = target / files::kTracker;
  std::ifstream in(tracker);
  int64_t latest = -1;
  if (in >> latest && latest > iteration) {
    fail_user("{} names iteration {}, newer than the converted checkpoint's {}: convert would move it back, and a run "
              "resuming {} would go back to iteration {}. Write into another directory, or pass --overwrite.",
              tracker.string(), latest, iteration, target.string(), iteration);
  }
}

}  // namespace

int run_convert(const ConvertOptions& o) {
  if (o.format != "whole" && o.format != "sharded") {
    fail_user("--format {}: expected whole or sharded", o.format);
  }
  const auto found = find_checkpoint(o.source);
  if (!found) fail_user("{} holds no checkpoint yet: nothing to convert", o.source);
  if (!found->resume) {
    fail_user("{} is a Hugging Face checkpoint (weights only); `moeforge train --load {}` starts from it on any layout. "
              "convert takes training checkpoints (a save directory or an iter_* directory).",
              o.source, o.source);
  }
  const std::string src = found->dir;
  // The source is never written: not its save directory, not the checkpoint or anything inside
  // it, and no iter_* directory beside it (which the save directory's tracker and pruning would own).
  auto norm = [](const fs::path& p) {
    fs::path n = fs::weakly_canonical(p).lexically_normal();
    return n.has_filename() ? n : n.parent_path();  // "dir/" names dir
  };
  const fs::path checkpoint = norm(src), save = checkpoint.parent_path(), into = norm(o.target);
  const bool inside_checkpoint =
      std::mismatch(checkpoint.begin(), checkpoint.end(), into.begin(), into.end()).first == checkpoint.end();
  const bool beside = into.parent_path() == save && into.filename().string().rfind("iter_", 0) == 0;
  if (into == save || inside_checkpoint || beside) {
    fail_user("{} is {} {}: write the converted checkpoint into another directory, so the original stays as it is.",
              o.target, into == save ? "the save directory of" : inside_checkpoint ? "inside the checkpoint" : "beside",
              src);
  }
  // The checkpoint's own resolved config; --set changes the target layout (or anything else).
  const std::string config_file = (fs::path(src) / files::kResolvedConfig).string();
  if (!fs::exists(config_file)) fail_user("{} is missing: {} is not a complete training checkpoint", config_file, src);
  LoadedConfig loaded = load_config(config_file, o.overrides);
  ExperimentConfig& c = loaded.config;
  const SavedTrainState saved = read_train_state(src);

  const bool from_sharded = is_sharded_checkpoint(src);
  spdlog::info("reading {} ({})", src, from_sharded ? "sharded, " + read_shard_layout(src).describe() : "whole");
  CheckpointContents contents = from_sharded ? read_all_shards(src)
                                             : read_whole(src, c.model, saved.bf16);
  contents.optimizer_steps = saved.optimizer_steps;
  check_optimizer_names(contents, src);

  // The target is a save directory: a training run writing there (or another convert) holds its
  // lock, and what it already holds is not replaced or rewound without --overwrite.
  fs::create_directories(o.target);
  const auto lock = DirectoryLock::acquire(o.target, "convert target");
  if (!o.overwrite) refuse_to_replace(o.target, saved.state.iteration);
  const int64_t tag = ::getpid();
  const std::string tmp = prepare_checkpoint_dir(o.target, saved.state.iteration, tag);
  std::string to;
  if (o.format == "whole") {
    c.checkpoint.format = CheckpointFormat::whole;
    write_whole_checkpoint(tmp, contents, c);
    to = "whole";
  } else {
    c.checkpoint.format = CheckpointFormat::sharded;
    // The shards depend on PP (and the uneven first/last stage sizes) and EP only; DP is free.
    const ModelPartition target = shard_partition(c);
    write_all_shards(tmp, target, contents);
    to = "sharded, " + ShardLayout::of(target.layout()).describe();
  }
  const std::string dir = commit_checkpoint(o.target, tmp, saved.state, saved.optimizer_steps, c, 0,
                                            {{"format", o.format}, {"converted_from", fs::absolute(src).string()}});
  spdlog::info("wrote {} ({}): {} model tensors ({} elements) and {} optimizer tensors ({} elements), iteration {}", dir,
               to, contents.model.size(), elements(contents.model), contents.optimizer.size(),
               elements(contents.optimizer), saved.state.iteration);
  spdlog::info("resume with: moeforge train CONFIG --load {}", o.target);
  return 0;
}

}  // namespace moeforge
