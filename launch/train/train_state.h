// defines: TrainState, SavedTrainState, train_state_json, read_train_state, checkpoint_iteration
//
// trainer_state.json, a training checkpoint's record of where the run stands: the counters a
// resume continues from, the precision, and the datasets the run read (data/dataset_identity.h).
// Rank 0 writes it in both checkpoint formats (commit_checkpoint); every resume and `moeforge
// convert` read it. A damaged or edited file would resume at a wrong place, overflow the data
// loader's or the LR schedule's arithmetic, or save over other checkpoints: each field is checked
// for its type and its range, and a problem names the field and its value.
#pragma once

#include "data/dataset_identity.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

struct TrainState {
  int64_t iteration = 0;  // completed iterations
  int64_t consumed_train_samples = 0;
  int64_t consumed_valid_samples = 0;
  int64_t lr_num_steps = 0;  // LrSchedule::num_steps
  int64_t skipped_iterations = 0;
  // What the run read; nullopt: not recorded (a run without datasets, or a checkpoint written
  // before moeforge recorded them).
  std::optional<std::vector<data::DatasetIdentity>> datasets;
};

struct SavedTrainState {
  TrainState state;
  int64_t optimizer_steps = 0;
  bool bf16 = false;
};

// The file's contents (without moeforge_version and the format keys commit_checkpoint adds).
nlohmann::json train_state_json(const TrainState& state, int64_t optimizer_steps, bool bf16);

// trainer_state.json of the training checkpoint `dir`. Throws UserError naming the file and every
// field that is missing, of another type or out of range, with the fix.
SavedTrainState read_train_state(const std::string& dir);

// The iteration an iter_NNNNNNN directory is named for; nullopt for any other name (or a number
// beyond 64 bits).
std::optional<int64_t> checkpoint_iteration(const std::filesystem::path& dir);

}  // namespace moeforge
