// defines: ShardLayout, TensorShapes, ShardReader, shard_dir_name, is_sharded_checkpoint,
//          read_shard_layout, check_shard_layout, write_shard, write_shard_manifest, read_all_shards, write_all_shards,
//          kShardManifestFile
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
// own stage's state. An expert tensor in shard `ep` holds experts [ep E/EP, (ep+1) E/EP) along
// dim 0. A sharded checkpoint resumes on the same PP x EP (any DP); `moeforge convert` turns it
// into a whole checkpoint or another PP x EP, checking every name and shape against shards.json.
#pragma once

#include "launch/train_checkpoint.h"

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge {

inline constexpr const char* kShardManifestFile = "shards.json";

struct ShardLayout {
  int64_t pp = 1, ep = 1;
  std::vector<int64_t> layers_per_stage;

  bool operator==(const ShardLayout&) const = default;
  std::string describe() const;  // "PP 2 x EP 2, layers per stage [2, 2]"
  // The stage holding a parameter (or its optimizer state: exp_avg.<name>, ...): layers.N.* by
  // layer, the embedding on the first stage, the final norm and the head on the last.
  int64_t stage_of(std::string_view tensor_name) const;
};

using TensorShapes = std::map<std::string, std::vector<int64_t>>;

std::string shard_dir_name(int64_t stage, int64_t ep_rank);  // "mp_rank_00_001_000"
bool is_sharded_checkpoint(const std::string& dir);
ShardLayout read_shard_layout(const std::string& dir);  // UserError naming shards.json when malformed
// UserError, naming the `moeforge convert` command that fixes it, unless `dir` was sharded as `run`.
void check_shard_layout(const std::string& dir, const ShardLayout& run);

// Writes shard (stage, ep_rank) into the checkpoint directory `dir`: the tensors of `model` and
// `optimizer` (this rank's: its stage, its experts), dense ones only when ep_rank == 0, plus
// `rng` (this process's generator when undefined). Files are written atomically and synced.
void write_shard(const std::string& dir, int64_t stage, int64_t ep_rank, const NamedTensors& model,
                 const NamedTensors& optimizer, const torch::Tensor& rng = {});

// shards.json: the layout and the full (all experts) shape of every model and optimizer tensor.
void write_shard_manifest(const std::string& dir, const ShardLayout& layout, const TensorShapes& model,
                          const TensorShapes& optimizer);

// One rank's view of a sharded checkpoint: the dense tensors of its stage and its experts.
class ShardReader {
 public:
  ShardReader(const std::string& dir, int64_t stage, int64_t ep_rank);
  std::optional<torch::Tensor> model(const std::string& name) const;
  std::optional<torch::Tensor> optimizer(const std::string& name) const;  // fp32
  std::optional<torch::Tensor> rng() const;
  std::string describe() const;  // the shard directories read

 private:
  std::vector<SafetensorsFile> model_, optimizer_;  // [dense shard (EP rank 0), own shard]
};

// Every shard assembled into whole tensors (experts concatenated in EP order). Fails, listing them
// all, on a tensor missing from or mis-shaped against shards.json and on a shard tensor that
// shards.json does not name: nothing is dropped or invented. The RNG is shard (0, 0)'s.
CheckpointContents read_all_shards(const std::string& dir);

// Splits whole contents into `layout`'s shards under `dir` and writes shards.json. Fails when an
// expert tensor's experts do not divide by EP.
void write_all_shards(const std::string& dir, const ShardLayout& layout, const CheckpointContents& contents);

}  // namespace moeforge
