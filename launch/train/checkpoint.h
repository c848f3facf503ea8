// defines: CheckpointContents, save_checkpoint, prepare_checkpoint_dir, write_whole_checkpoint,
//          commit_checkpoint, find_checkpoint, CheckpointToLoad, is_sharded_checkpoint,
//          checkpoint_model_config, model_config_differences, backbone_config_differences
//          (trainer_state.json: launch/train/train_state.h)
//
// File names: core/files/file_names.h.
// Training checkpoints, Megatron's directory layout with a Hugging Face model inside:
//
//   <save>/latest_checkpointed_iteration.txt    the newest complete checkpoint's iteration
//   <save>/iter_0000010/config.json              \ the model as a Hugging Face checkpoint
//   <save>/iter_0000010/model.safetensors        / (moeforge forward and transformers load it)
//   <save>/iter_0000010/optimizer.safetensors    Adam moments, fp32 master weights (bf16), RNG
//   <save>/iter_0000010/trainer_state.json       iteration, consumed samples, schedule, counters
//   <save>/iter_0000010/config.yaml              the resolved experiment config
//
// A save is atomic: everything is written into `iter_0000010.tmp-<pid>`, each file fsynced, the
// directory renamed into place (or, when that iteration exists, exchanged with it atomically) and
// the save directory fsynced, and only then is the tracker file replaced (written to a temporary,
// fsynced, renamed). A process killed at any point leaves the previous checkpoint as the latest,
// complete and loadable. With checkpoint.format: sharded the model and optimizer files are replaced
// by one directory per pipeline stage and EP rank (launch/train/sharded_checkpoint.h), written by the
// ranks holding them between prepare_checkpoint_dir() and commit_checkpoint().
#pragma once

#include "core/config/config.h"
#include "core/files/file_names.h"
#include "core/model/gpt_model.h"
#include "core/optim/optimizer.h"
#include "launch/train/train_state.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

// What a checkpoint holds, whole: every parameter and its optimizer state with all experts
// (gathered from the ranks that hold them), so a checkpoint does not depend on the parallel layout.
struct CheckpointContents {
  NamedTensors model;      // our parameter names
  NamedTensors optimizer;  // Optimizer::state() names
  int64_t optimizer_steps = 0;
  torch::Tensor rng;  // the CPU generator's state to store; undefined = this process's, now
};

// The names of the floating tensors of `contents` (this rank's part) holding a NaN or an infinity:
// such a state is never saved. One device read when all are finite (the usual case), one per
// tensor otherwise.
std::vector<std::string> nonfinite_tensors(const CheckpointContents& contents);

// Writes <save_dir>/iter_<iteration> atomically, points the tracker at it, then removes all but
// the newest `keep_latest_k` checkpoints (0 = keep all). Returns the checkpoint's directory.
std::string save_checkpoint(const std::string& save_dir, const TrainState& state, const CheckpointContents& contents,
                            const ExperimentConfig& config, int64_t keep_latest_k);

// The steps of a save, for checkpoints several processes write. One process prepares: clears
// leftovers of killed saves and creates the temporary directory (named by `tag`, the same on
// every rank) that it returns; the writers fill it; one process commits: writes
// trainer_state.json (plus `extra` keys) and config.yaml, syncs, renames the directory into place,
// moves the tracker and prunes. Returns the final directory.
std::string prepare_checkpoint_dir(const std::string& save_dir, int64_t iteration, int64_t tag);
std::string checkpoint_tmp_dir(const std::string& save_dir, int64_t iteration, int64_t tag);
void write_whole_checkpoint(const std::string& dir, const CheckpointContents& contents, const ExperimentConfig& config);
std::string commit_checkpoint(const std::string& save_dir, const std::string& tmp_dir, const TrainState& state,
                              int64_t optimizer_steps, const ExperimentConfig& config, int64_t keep_latest_k,
                              const nlohmann::json& extra = nlohmann::json::object());

struct CheckpointToLoad {
  std::string dir;
  bool resume = false;  // a training checkpoint (state and optimizer too); false = model weights only
};

// What a --load path names: a save directory (its latest checkpoint, from the tracker; without a
// tracker, its newest complete iter_N), one training checkpoint directory, or a Hugging Face
// checkpoint (weights only). nullopt for a save directory holding no checkpoint yet. Throws
// UserError for anything else.
std::optional<CheckpointToLoad> find_checkpoint(const std::string& path);

// The newest complete iter_N directory of `save` (trainer_state.json and config.yaml present),
// whether or not the tracker names it.
std::optional<std::filesystem::path> newest_untracked_checkpoint(const std::filesystem::path& save);

// Whether `dir` is a sharded training checkpoint (it holds shards.json).
bool is_sharded_checkpoint(const std::string& dir);

// The model section a checkpoint holds: config.json of a Hugging Face or whole checkpoint, the
// resolved config.yaml of a sharded one.
ModelConfig checkpoint_model_config(const std::string& dir);

// "hidden_size: checkpoint 64, config 128" for every shape- or math-relevant value that differs.
std::vector<std::string> model_config_differences(const ModelConfig& checkpoint, const ModelConfig& config);
// The same for the values outside the feed-forward parts (layers, widths, heads, vocabulary,
// biases, tying, RoPE base, norm epsilon); `label` names the checkpoint ("dense checkpoint").
std::vector<std::string> backbone_config_differences(const ModelConfig& checkpoint, const ModelConfig& config,
                                                     const std::string& label = "checkpoint");

}  // namespace moeforge
