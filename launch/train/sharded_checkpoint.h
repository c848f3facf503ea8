// defines: ShardLayout, TensorShapes, ShardReader, read_shard_layout,
//          check_shard_layout, write_shard, write_shard_manifest, load_shard_weights, read_all_shards,
//          write_all_shards
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
// A sharded checkpoint resumes on the same PP x EP (any DP); `moeforge convert` turns it into a
// whole checkpoint or another PP x EP, checking every name and shape against shards.json.
#pragma once

#include "launch/train/checkpoint.h"
#include "parallel/parallelize.h"

#include <map>
#include <optional>
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
// UserError, naming the `moeforge convert` command that fixes it, unless `dir` was sharded as `run`.
void check_shard_layout(const std::string& dir, const ShardLayout& run);

// Writes shard (stage, ep_rank) into the checkpoint directory `dir`: the tensors of `model` and
// `optimizer` (this rank's: its stage, its experts), dense ones only when ep_rank == 0, plus
// `rng` (this process's generator when undefined). Files are written durably.
void write_shard(const std::string& dir, const ModelPartition& partition, int64_t stage, int64_t ep_rank,
                 const NamedTensors& model, const NamedTensors& optimizer, const torch::Tensor& rng = {});

// shards.json: the layout and the full (all experts) shape of every model tensor (from the
// partition) and optimizer tensor.
void write_shard_manifest(const std::string& dir, const ModelPartition& partition, const TensorShapes& optimizer);

// One rank's view of a sharded checkpoint: the dense tensors of its stage and its experts.
class ShardReader {
 public:
  ShardReader(const std::string& dir, const ModelShard& shard);
  std::optional<torch::Tensor> model(const std::string& name) const;
  std::optional<torch::Tensor> optimizer(const std::string& name) const;  // fp32
  std::optional<torch::Tensor> rng() const;
  std::string describe() const;  // the shard directories read

 private:
  const ModelPartition& partition_;
  std::vector<SafetensorsFile> model_, optimizer_;  // [dense shard (EP rank 0), own shard]
};

// Copies this rank's shard of `dir` into its materialised parameters; UserError listing every
// missing or mis-shaped tensor.
void load_shard_weights(const std::string& dir, model::GPTModelImpl& model, const ModelShard& shard);

// Every shard assembled into whole tensors (experts concatenated in EP order), for the partition of
// the layout the checkpoint was saved with. Fails, listing them all, on a tensor missing from or
// mis-shaped against shards.json and on a shard tensor that shards.json does not name: nothing is
// dropped or invented. The RNG is shard (0, 0)'s.
CheckpointContents read_all_shards(const std::string& dir, const ModelPartition& saved_as);

// Splits whole contents into the shards of `target`'s layout under `dir` and writes shards.json.
void write_all_shards(const std::string& dir, const ModelPartition& target, const CheckpointContents& contents);

}  // namespace moeforge
