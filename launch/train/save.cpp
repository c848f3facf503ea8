#include "launch/train/save.h"

#include "core/device/host_sync.h"
#include "parallel/pipeline.h"

#include <unistd.h>

namespace moeforge {

namespace {

// A save's writers may take far longer than any collective (the mission's whole checkpoint needs
// ~330 MB/s to fit the default distributed timeout): the other ranks wait for them at this bound.
SlowWait save_wait(const ExperimentConfig& c) {
  return {"the wait for the checkpoint's writers", c.checkpoint.save_timeout_minutes * 60.0,
          "checkpoint.save_timeout_minutes"};
}

std::string save_sharded(const CheckpointContents& contents, const TrainState& state, const ExperimentConfig& c,
                         const ModelShard& shard, const ProcessGroups& groups, const TensorShapes& optimizer_shapes) {
  // Rank 0 prepares the directory and names it; the first expert-DP replica of every (stage, EP
  // rank) writes its shard; rank 0 commits once all have written.
  const auto& k = c.checkpoint;
  const bool rank0 = groups.world->rank() == 0;
  auto tag = torch::full({1}, static_cast<int64_t>(::getpid()), torch::kInt64);  // host: a pid
  if (rank0) prepare_checkpoint_dir(k.save, state.iteration, tag.item<int64_t>());
  groups.world->broadcast(tag, 0);
  const std::string tmp = checkpoint_tmp_dir(k.save, state.iteration, tag.item<int64_t>());
  groups.world->barrier();
  if (shard.at.edp == 0) write_shard(tmp, shard.partition, shard.at.pp, shard.at.ep, contents.model, contents.optimizer);
  groups.world->slow_barrier(save_wait(c));
  if (!rank0) return "";
  write_shard_manifest(tmp, shard.partition, optimizer_shapes);
  return commit_checkpoint(k.save, tmp, state, contents.optimizer_steps, c, k.keep_latest_k, {{"format", "sharded"}});
}

std::string save_whole(CheckpointContents contents, const TrainState& state, const ExperimentConfig& c,
                       const ModelShard& shard, const ProcessGroups& groups) {
  // Only the first expert-data-parallel replica carries data (the others hold copies; each of
  // their TP, EP and PP groups lies wholly outside it, so they skip together). Everything travels
  // through host memory, one tensor at a time: the device never holds a gathered tensor, and a
  // rank whose result no one needs drops each one at once.
  if (shard.at.edp != 0) return "";
  const auto sets = {&contents.model, &contents.optimizer};
  for (auto* set : sets) {
    for (auto& [name, t] : *set) t = to_host(t);
  }
  const bool tp_first = shard.at.tp == 0, ep_first = tp_first && shard.at.ep == 0;
  for (auto* set : sets) gather_tensor_parallel(*set, shard.partition, *groups.tp, tp_first);
  for (auto* set : sets) gather_expert_parallel(*set, shard.partition, *groups.ep, ep_first);
  for (auto* set : sets) gather_to_first_stage(*set, *groups.pp);
  if (groups.world->rank() != 0) return "";
  return save_checkpoint(c.checkpoint.save, state, contents, c, c.checkpoint.keep_latest_k);
}

}  // namespace

std::string save_training_checkpoint(CheckpointContents contents, const TrainState& state, const ExperimentConfig& c,
                                     const ModelShard& shard, const ProcessGroups& groups,
                                     const TensorShapes& full_optimizer_shapes) {
  const std::string dir = c.checkpoint.format == CheckpointFormat::sharded
                              ? save_sharded(contents, state, c, shard, groups, full_optimizer_shapes)
                              : save_whole(std::move(contents), state, c, shard, groups);
  groups.world->slow_barrier(save_wait(c));  // rank 0 has committed
  return dir;
}

}  // namespace moeforge
