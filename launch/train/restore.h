// defines: load_model_weights, load_training_state
//
// What a run resumes or starts from, read into this rank's part of the model and optimizer: a
// Hugging Face checkpoint's weights, or a whole or sharded training checkpoint's weights, optimizer
// state, counters and RNG. The caller has checked that the checkpoint fits the run
// (check_checkpoint_fits, launch/train/startup_checks.h).
#pragma once

#include "core/model/gpt_model.h"
#include "core/optim/optimizer.h"
#include "launch/train/checkpoint.h"
#include "parallel/parallelize.h"

#include <string>

namespace moeforge {

// Copies a checkpoint's weights (Hugging Face, whole or sharded training checkpoint) into this
// rank's materialised parameters of `model`: its stage's, its experts. Reads only those tensors.
void load_model_weights(const std::string& dir, model::GPTModelImpl& model, const ModelShard& shard);

// Restores the optimizer (and, in bf16, the model from the fp32 master weights) and the RNG from a
// training checkpoint whose weights are already loaded; returns its state. From a whole
// checkpoint, expert tensors are cut to this rank's experts; from a sharded one this rank's shards
// are read. Throws UserError when the checkpoint's training.bf16 differs from `bf16`.
TrainState load_training_state(const std::string& dir, Optimizer& optimizer, bool bf16, const ModelShard& shard);

}  // namespace moeforge
