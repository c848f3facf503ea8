#include "launch/train/restore.h"

#include "core/files/file_names.h"
#include "core/files/safetensors.h"
#include "launch/train/sharded_checkpoint.h"
#include "launch/train/startup_checks.h"
#include "moe/hf_checkpoint.h"

#include <filesystem>

namespace fs = std::filesystem;

namespace moeforge {

void load_model_weights(const std::string& dir, model::GPTModelImpl& model, const ModelShard& shard) {
  if (is_sharded_checkpoint(dir)) return load_shard_weights(dir, model, shard);
  moe::TensorPart part;
  if (shard.partition.layout().tp() > 1) {
    part = [&](const std::string& name, const torch::Tensor& whole) {
      return tensor_parallel_part(whole, shard.partition.at(name).tp, shard.at.tp, shard.partition.layout().tp());
    };
  }
  moe::load_hf_weights(dir, model, [&](const std::string&) { return shard.partition.first_expert(shard.at.ep); }, part);
}

TrainState load_training_state(const std::string& dir, Optimizer& optimizer, bool bf16, const ModelShard& shard) {
  check_precision_matches(dir, bf16);
  const SavedTrainState saved = read_train_state(dir);
  torch::Tensor rng;
  if (is_sharded_checkpoint(dir)) {
    const ShardReader reader(dir, shard);
    optimizer.load_state([&](const std::string& name) { return reader.optimizer(name); }, reader.describe(),
                         saved.optimizer_steps);
    if (auto r = reader.rng()) rng = *r;
  } else {
    const SafetensorsFile opt((fs::path(dir) / files::kOptimizer).string());
    optimizer.load_state(
        [&](const std::string& name) -> std::optional<torch::Tensor> {
          if (!opt.contains(name)) return std::nullopt;
          auto t = opt.tensor_exactly(name, torch::kFloat32);
          // A tensor of the whole model's shape gives this rank its part (its experts, its
          // tensor-parallel part); any other is left as it is, to be reported as mis-shaped.
          if (t.sizes() == torch::IntArrayRef(shard.partition.at(name).shape)) {
            t = shard.partition.local_part(name, t, shard.at.ep, shard.at.tp);
          }
          return t;
        },
        opt.path(), saved.optimizer_steps);
    if (opt.contains(files::kRngTensor)) rng = opt.tensor_exactly(files::kRngTensor, torch::kUInt8);
  }
  if (rng.defined()) {
    auto generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(rng);
  }
  return saved.state;
}

}  // namespace moeforge
