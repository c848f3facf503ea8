// defines: StartPoint, start_point, check_data, check_output_dir, check_checkpoint_fits,
//          check_model_matches, check_precision_matches, check_datasets_match, check_trainable,
//          check_memory_fits, check_gpu_build, device_collectives
//
// The checks a training run makes before it allocates anything, in one place: the trainer calls
// them (and stops at the first failure), `moeforge train --dry-run` calls the same functions and
// lists every failure, so both refuse a config with the same message. Each throws a UserError.
// The parallel layout's rules are ParallelLayout::create's (parallel/layout/layout.h), checked first by both.
#pragma once

#include "core/config/config.h"
#include "data/dataset_identity.h"
#include "launch/train/checkpoint.h"
#include "parallel/layout/layout.h"

#include <optional>
#include <string>

namespace moeforge {

// What a run starts from: --load / checkpoint.load, or, as Megatron, the latest checkpoint in
// checkpoint.save when it holds one (re-running a command after a crash resumes) unless --load
// names a training checkpoint explicitly; weights named by --load were that run's starting point.
struct StartPoint {
  std::optional<CheckpointToLoad> checkpoint;
  bool from_save = false;  // the latest checkpoint of checkpoint.save
};
StartPoint start_point(const CheckpointConfig& checkpoint);

// data.split and data.data_path valid, data.tokenizer_model (when set) exists, every dataset's
// index opens and validates, the train split gets documents, and every dataset's token ids lie in
// [0, model.padded_vocab_size()): proved by a uint8 / uint16 dtype when it can be, else by a scan of
// the .bin that is cached (data/token_ids.h), so it runs once per file for the dry run and every
// run after it. Returns "N dataset(s), M documents, indices valid; <how the ids fit>".
std::string check_data(const ExperimentConfig& config);

// `dir` (the value of config key `key`) can hold the run's output: created when `create`,
// otherwise only its nearest existing parent checked for write access (the dry run writes nothing).
void check_output_dir(const char* key, const std::string& dir, bool create);

// The checkpoint can start this run: its model is the config's (config.json or config.yaml), a
// training checkpoint was trained in the config's precision, a sharded one was sharded as `layout`.
void check_checkpoint_fits(const CheckpointToLoad& checkpoint, const ExperimentConfig& config, const ParallelLayout& layout);
void check_model_matches(const std::string& checkpoint_dir, const ModelConfig& config);
void check_precision_matches(const std::string& checkpoint_dir, bool bf16);
// The datasets the training checkpoint recorded against `now`, this run's: a change is refused,
// naming each file and what changed, unless `allow` (checkpoint.allow_dataset_change), which
// warns. A checkpoint that recorded none (written before moeforge recorded them) is warned about.
void check_datasets_match(const std::string& checkpoint_dir, const std::vector<data::DatasetIdentity>& now, bool allow);

// training.trainable / training.frozen against the whole model's parameter names (built on the
// meta device: no memory); the same check select_trainable() makes.
void check_trainable(const ExperimentConfig& config);

// What of a device's `total` bytes check_memory_fits lets the plan use: all but 5 % and 1.5 GiB.
int64_t usable_device_bytes(int64_t total);

// The memory plan (parallel/layout/plan.h) of the layout's largest stage must fit what it will run in:
// usable_device_bytes(`device_total`) per rank on a device, otherwise the host's memory (the
// cgroup's limit when lower) shared by `ranks_on_host` ranks. Refused before anything is
// allocated, with the planner's number; the plan omits allocator and runtime overhead (the
// device's headroom stands for it), so passing is necessary, not sufficient.
void check_memory_fits(const ExperimentConfig& config, const ParallelLayout& layout, std::optional<int64_t> device_total,
                       int64_t ranks_on_host);

// CUDA training across ranks over NCCL needs a CUDA build (host-staged collectives do not).
void check_gpu_build(const ExperimentConfig& config, int64_t world_size);
// parallel.device_collectives, its null resolved: nccl on CUDA, host on every other accelerator.
DeviceCollectives device_collectives(const ExperimentConfig& config);

}  // namespace moeforge
