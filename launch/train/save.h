// defines: save_training_checkpoint
//
// The other half of restore.h: a training checkpoint written from the parts every rank holds. The
// checkpoint's files and their atomic commit are checkpoint.h's and sharded_checkpoint.h's; this
// is who gathers what and who writes.
#pragma once

#include "core/config/config.h"
#include "launch/train/checkpoint.h"
#include "launch/train/sharded_checkpoint.h"
#include "parallel/comm/process_groups.h"
#include "parallel/parallelize.h"

#include <string>

namespace moeforge {

// Saves iteration state.iteration into config.checkpoint.save from this rank's `contents` (its
// parameters and optimizer state), as checkpoint.format says:
//   whole:   tensor-parallel parts joined over TP, experts gathered over EP, stages to the first,
//            through host memory one tensor at a time; rank 0 writes;
//   sharded: the first expert-DP replica of every (stage, EP rank) writes its shard of the
//            directory rank 0 prepared; rank 0 writes shards.json (with `full_optimizer_shapes`)
//            and commits.
// Collective over the world; returns once the checkpoint is committed, the ranks that do not
// write waiting for those that do as long as checkpoint.save_timeout_minutes allows (a save is
// not bounded by parallel.distributed_timeout_minutes). Returns the checkpoint's directory on
// rank 0, "" on the others.
std::string save_training_checkpoint(CheckpointContents contents, const TrainState& state,
                                     const ExperimentConfig& config, const ModelShard& shard,
                                     const ProcessGroups& groups, const TensorShapes& full_optimizer_shapes);

}  // namespace moeforge
