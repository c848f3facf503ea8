#include "launch/train/startup_checks.h"

#include "core/errors.h"
#include "core/optimizer.h"
#include "data/blend.h"
#include "data/gpt_dataset.h"
#include "data/indexed_dataset.h"
#include "launch/train/sharded_checkpoint.h"
#include "moe/moe_layer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace fs = std::filesystem;

namespace moeforge {

StartPoint start_point(const CheckpointConfig& k) {
  StartPoint start;
  if (!k.load.empty()) {
    start.checkpoint = find_checkpoint(k.load);
    if (!start.checkpoint) fail_user("{} holds no checkpoint yet. Remove checkpoint.load / --load to start fresh.", k.load);
  }
  start.from_save = !k.save.empty() && fs::exists(fs::path(k.save) / files::kTracker) &&
                    !(start.checkpoint && start.checkpoint->resume);
  if (start.from_save) {
    if (start.checkpoint) {
      spdlog::info("checkpoint.save {} already holds a checkpoint: resuming it instead of starting again from {}", k.save,
                   start.checkpoint->dir);
    }
    start.checkpoint = find_checkpoint(k.save);
  }
  return start;
}

std::string check_data(const ExperimentConfig& c) {
  data::validate_data_config(c.data);
  if (c.data.data_path.empty()) fail_user("data.data_path is empty: name the Megatron dataset prefix(es) to train on.");
  const auto split = data::parse_split(c.data.split);
  const auto prefixes = data::parse_blend(c.data.data_path).prefixes;
  int64_t documents = 0;
  bool train = false;
  for (const auto& prefix : prefixes) {
    const data::IndexedDataset d(prefix);  // maps and validates the index; reads no tokens
    documents += d.num_documents();
    train = train || data::split_document_ranges(split, d.num_sequences())[0].has_value();
  }
  if (!train) fail_user("data.split '{}' gives the train split no documents: training needs some", c.data.split);
  return fmt::format("{} dataset(s), {} documents", prefixes.size(), documents);
}

void check_output_dir(const char* key, const std::string& dir, bool create) {
  // The same reasons either way: what creating the directory failed with, or would fail with.
  std::string why;
  std::error_code ec;
  fs::path probe = dir;
  if (create) {
    fs::create_directories(dir, ec);
    if (ec) why = ec.message();
  } else {
    probe = fs::absolute(dir, ec);
    while (!probe.empty() && probe != probe.root_path() && !fs::exists(probe, ec)) probe = probe.parent_path();
    if (!fs::is_directory(probe, ec)) why = std::strerror(ENOTDIR);
  }
  if (why.empty() && ::access(probe.c_str(), W_OK) != 0) why = std::strerror(errno);
  if (!why.empty()) fail_user("{} {} cannot be created or written ({}). Choose a writable directory.", key, dir, why);
}

void check_model_matches(const std::string& dir, const ModelConfig& config) {
  const auto diffs = model_config_differences(checkpoint_model_config(dir), config);
  if (!diffs.empty()) {
    fail_user("{} holds a different model than the config describes ({} difference{}):\n  - {}\nFix the config's model "
              "section or load another checkpoint.",
              dir, diffs.size(), diffs.size() > 1 ? "s" : "", fmt::join(diffs, "\n  - "));
  }
}

void check_precision_matches(const std::string& dir, bool bf16) {
  const SavedTrainState saved = read_train_state(dir);
  if (saved.bf16 != bf16) {
    fail_user("{} was trained with training.bf16 = {}, this config says {}: a resumed run keeps its precision. Set "
              "training.bf16: {}.",
              dir, saved.bf16, bf16, saved.bf16);
  }
}

void check_checkpoint_fits(const CheckpointToLoad& checkpoint, const ExperimentConfig& c, const ParallelLayout& layout) {
  if (is_sharded_checkpoint(checkpoint.dir)) check_shard_layout(checkpoint.dir, ShardLayout::of(layout));
  check_model_matches(checkpoint.dir, c.model);
  if (checkpoint.resume) check_precision_matches(checkpoint.dir, c.training.bf16);
}

void check_trainable(const ExperimentConfig& c) {
  const auto model = moe::build_model(c.model);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& item : model->named_parameters()) named.emplace_back(item.key(), item.value());
  select_trainable(named, c.training);
}

void check_gpu_build(const ExperimentConfig& c, int64_t world) {
#ifndef MOEFORGE_WITH_CUDA
  if (c.hardware.device == Device::cuda && world > 1) {
    fail_user("GPU training across ranks needs NCCL, and this build has no CUDA (see the GPU line of the CMake "
              "summary). Build on a machine with nvcc matching the torch wheel, or train with hardware.device: cpu.");
  }
#else
  (void)c;
  (void)world;
#endif
}

}  // namespace moeforge
