// defines: the file-name table: every file and directory name moeforge reads or writes by
//          convention (Hugging Face checkpoints, training checkpoints, run directories)
//
// One table, so that the writer and every reader of a file spell it the same way.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <string>

namespace moeforge::files {

// A Hugging Face checkpoint directory (what transformers loads).
inline constexpr const char* kHfConfig = "config.json";
inline constexpr const char* kSafetensors = "model.safetensors";
inline constexpr const char* kSafetensorsIndex = "model.safetensors.index.json";

// A training checkpoint: <save>/iter_0000010/ (Megatron's layout, launch/train/checkpoint.h).
inline constexpr const char* kTracker = "latest_checkpointed_iteration.txt";  // in <save>
inline constexpr const char* kTrainerState = "trainer_state.json";
inline constexpr const char* kOptimizer = "optimizer.safetensors";
inline constexpr const char* kRngTensor = "rng.cpu";  // a tensor inside kOptimizer
inline constexpr const char* kResolvedConfig = "config.yaml";  // also in every run directory
inline constexpr const char* kShardManifest = "shards.json";    // sharded checkpoints only
inline std::string iteration_dir(int64_t iteration) { return fmt::format("iter_{:07d}", iteration); }
// A sharded checkpoint's shard of (pipeline stage, expert-parallel rank), as Megatron names it.
inline std::string shard_dir(int64_t stage, int64_t ep_rank) { return fmt::format("mp_rank_00_{:03d}_{:03d}", stage, ep_rank); }

// A run directory (logging.run_dir).
inline constexpr const char* kMetrics = "metrics.jsonl";
inline constexpr const char* kEnvironment = "environment.json";
inline constexpr const char* kPlan = "plan.json";
inline constexpr const char* kExpertLoads = "expert_loads.jsonl";  // logging.expert_loads_interval

// In every directory a run writes into while it runs (core/files/dir_lock.h).
inline constexpr const char* kDirectoryLock = "moeforge.lock";

// An upcycled checkpoint's record of how it was made.
inline constexpr const char* kUpcycleManifest = "upcycle.json";

}  // namespace moeforge::files
