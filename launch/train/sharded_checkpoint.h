// defines: ShardLayout, TensorShapes, ShardFiles, ShardReader, read_shard_layout, shard_partition,
//          saved_partition, check_shards_loadable, describe_reshard, write_shard, write_shard_manifest,
//          load_shard_weights, read_all_shards, write_all_shards
//
// Sharded training checkpoints (checkpoint.format: sharded), laid out as Megatron's:
//
//   iter_0000010/shards.json                          layout (PP, EP, layers per stage) and every
//                                                     tensor's full name and shape
//   iter_0000010/mp_rank_00_001_000/model.safetensors      stage 1, EP rank 0: the stage's dense
//   iter_0000010/mp_rank_00_001_000/optimizer.safetensors  tensors and EP rank 0's experts, their
//                                                          Adam state (gathered over DP), the RNG
//   iter_0000010/mp_rank_00_001_001/...                    stage 1, EP rank 1: its experts only
//   iter_0000010/trainer_state.json, config.yaml           as in a whole checkpoint
//
// The rank at (stage, EP rank, expert-DP index 0) writes each shard, so no rank holds more than its
// own stage's state. Which tensor belongs to which shard is the ModelPartition's answer
// (parallel/parallelize.h): an expert tensor in shard `ep` holds that EP rank's block of experts.
// A sharded checkpoint resumes on any PP x EP (any DP, any virtual stages, any split of the layers
// over the stages), with TP 1: a run whose layout differs reshards it on load, each rank reading
// from the saved shards only the tensors of its own stage and, of each expert weight, the rows of
// its own experts (ShardFiles). `moeforge convert` reads through the same ShardFiles to turn it
// into a whole checkpoint or the shards of another layout.
#pragma once

#include "launch/train/checkpoint.h"
#include "parallel/parallelize.h"

#include <map>
#include <optional>
#include <set>
#include <tuple>
#include <string>
#include <vector>

namespace moeforge {

// The part of a parallel layout a sharded checkpoint depends on (DP is free).
struct ShardLayout {
  int64_t pp = 1, ep = 1;
  int64_t vpp = 1;  // model chunks per stage (interleaved pipeline); 1 in manifests that lack it
  std::vector<int64_t> layers_per_stage;

  static ShardLayout of(const ParallelLayout& layout);
  bool operator==(const ShardLayout&) const = default;
  std::string describe() const;  // "PP 2 x EP 2, layers per stage [2, 2]"
};

using TensorShapes = std::map<std::string, std::vector<int64_t>>;

ShardLayout read_shard_layout(const std::string& dir);  // UserError naming shards.json when malformed

// The partition of `c`'s model under its own PP x EP (DP is free: the smallest world that holds
// them, or parallel.world_size), from a model built on the meta device (no memory).
ModelPartition shard_partition(const ExperimentConfig& c);
// The partition the sharded checkpoint `dir` was saved with, from its config.yaml, checked against
// its shards.json (UserError naming the file when they disagree: the checkpoint is damaged).
ModelPartition saved_partition(const std::string& dir);

// A run at `run` can load the sharded checkpoint `dir`: its shards.json is readable, and the run is
// not tensor-parallel (shards are not split over TP ranks; the error names the conversion to whole).
void check_shards_loadable(const std::string& dir, const ParallelLayout& run);
// The line a resharded load logs ("resharded DIR on load from LAYOUT to LAYOUT ..."), or nullopt
// when `dir` was sharded as `run`.
std::optional<std::string> describe_reshard(const std::string& dir, const ParallelLayout& run);

// Writes shard (stage, ep_rank) into the checkpoint directory `dir`: the tensors of `model` and
// `optimizer` (this rank's: its stage, its experts), dense ones only when ep_rank == 0, plus
// `rng` (this process's generator when undefined). Files are written durably.
void write_shard(const std::string& dir, const ModelPartition& partition, int64_t stage, int64_t ep_rank,
                 const NamedTensors& model, const NamedTensors& optimizer, const torch::Tensor& rng = {});

// shards.json: the layout and the full (all experts) shape of every model tensor (from the
// partition) and optimizer tensor.
void write_shard_manifest(const std::string& dir, const ModelPartition& partition, const TensorShapes& optimizer);

// The shard files of a sharded checkpoint, as it was saved (`saved_as`, its partition): where each
// tensor and each block of experts lives. Files are opened (mapped) when first read, and of a file
// only the tensors asked for are read, so a reader's memory is the tensors it asks for.
class ShardFiles {
 public:
  ShardFiles(std::string dir, ModelPartition saved_as);
  const ModelPartition& saved_as() const { return saved_; }
  const std::string& dir() const { return dir_; }

  // Tensor `name` of model.safetensors (stored dtype, floating) or, with `optimizer`,
  // optimizer.safetensors (fp32): a dense tensor whole; of an expert weight, experts
  // [first, first + count) in global order, each read (only its rows) from the EP shard that
  // holds it. nullopt, with a line per shard that lacks it or mis-sizes it in `problems`.
  std::optional<torch::Tensor> read(const std::string& name, bool optimizer, int64_t first, int64_t count,
                                    std::vector<std::string>& problems) const;
  // Shard (stage, ep_rank)'s file, opened once; UserError naming it when it is missing.
  const SafetensorsFile& file(int64_t stage, int64_t ep_rank, bool optimizer) const;
  // The tensors of the files opened so far that read() never returned (the RNG aside), as
  // "NAME in FILE".
  std::vector<std::string> unread() const;

 private:
  std::string dir_;
  ModelPartition saved_;
  mutable std::map<std::tuple<int64_t, int64_t, bool>, SafetensorsFile> files_;
  mutable std::set<std::pair<std::string, std::string>> read_;  // (file, tensor)
};

// One rank's view of a sharded checkpoint saved at any PP x EP: the dense tensors of its stage and
// the rows of its experts, read from whichever shards hold them.
class ShardReader {
 public:
  ShardReader(const std::string& dir, const ModelShard& shard);
  std::optional<torch::Tensor> model(const std::string& name) const;
  std::optional<torch::Tensor> optimizer(const std::string& name) const;  // fp32
  // The RNG of this rank's own shard; resharded, shard (0, 0)'s, as convert keeps it.
  std::optional<torch::Tensor> rng() const;
  bool resharded() const { return resharded_; }
  std::string describe() const;  // the checkpoint and, resharded, its saved layout

 private:
  std::optional<torch::Tensor> read(const std::string& name, bool optimizer) const;

  const ModelShard& shard_;
  ShardLayout saved_layout_;
  bool resharded_ = false;
  ShardFiles files_;
};

// Copies this rank's shard of `dir` into its materialised parameters; UserError listing every
// missing or mis-shaped tensor.
void load_shard_weights(const std::string& dir, model::GPTModelImpl& model, const ModelShard& shard);

// Every shard assembled into whole tensors (experts in global order, read through ShardFiles), by
// the partition the checkpoint was saved with (saved_partition). Fails, listing them all, on a tensor missing from or
// mis-shaped against shards.json and on a shard tensor that shards.json does not name: nothing is
// dropped or invented. The RNG is shard (0, 0)'s.
CheckpointContents read_all_shards(const std::string& dir);

// Splits whole contents into the shards of `target`'s layout under `dir` and writes shards.json.
void write_all_shards(const std::string& dir, const ModelPartition& target, const CheckpointContents& contents);

}  // namespace moeforge
