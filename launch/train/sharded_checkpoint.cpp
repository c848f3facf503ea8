#include "launch/train/sharded_checkpoint.h"

#include "core/files/durable_file.h"
#include "core/base/errors.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge {

namespace {

// A weight or optimizer tensor in its stored dtype, which must be a floating type (an integer
// header on a weight is damage, refused by SafetensorsFile::tensor).
torch::Tensor floating_as_stored(const SafetensorsFile& file, const std::string& name) {
  const auto stored = file.info(name).scalar_type;
  return file.tensor(name, c10::isFloatingType(stored) ? stored : torch::kFloat32);
}


std::vector<int64_t> shape_of(const torch::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

// The tensors of `all` that shard (stage, ep_rank) holds: with `cut`, `all` is whole and each
// expert tensor is cut to the shard's block; without, `all` is a rank's own (already its experts).
NamedTensors shard_part(const NamedTensors& all, const ModelPartition& partition, int64_t stage, int64_t ep_rank,
                        bool cut) {
  NamedTensors out;
  for (const auto& [name, t] : all) {
    const ParameterPlacement& where = partition.at(name);
    if (cut && where.stage != stage) continue;
    if (!where.expert_parallel && ep_rank != 0) continue;  // dense tensors live in EP rank 0's shard
    out.emplace_back(name, cut ? partition.local_part(name, t, ep_rank) : t);
  }
  return out;
}

[[noreturn]] void damaged(const fs::path& path, const std::string& why) {
  fail_user("{}: {}. The checkpoint is damaged: load another one.", path.string(), why);
}

json read_manifest(const std::string& dir) {
  const fs::path path = fs::path(dir) / files::kShardManifest;
  try {
    return json::parse(std::ifstream(path));
  } catch (const json::exception& e) {
    damaged(path, fmt::format("unreadable ({})", e.what()));
  }
}

}  // namespace

ShardLayout ShardLayout::of(const ParallelLayout& layout) {
  if (layout.tp() > 1) {
    fail_user("sharded checkpoints do not split tensors over tensor-parallel ranks yet (parallel."
              "tensor_model_parallel_size {}): use checkpoint.format whole, or convert with TP 1",
              layout.tp());
  }
  return {layout.pp(), layout.ep(), layout.vpp(), layout.layers_per_stage()};
}

std::string ShardLayout::describe() const {
  const std::string chunks = vpp > 1 ? fmt::format(" in {} interleaved chunks", vpp) : std::string();
  return fmt::format("PP {} x EP {}, layers per stage [{}]{}", pp, ep, fmt::join(layers_per_stage, ", "), chunks);
}

void check_shard_layout(const std::string& dir, const ShardLayout& run) {
  const ShardLayout saved = read_shard_layout(dir);
  if (saved == run) return;
  fail_user("{} is a sharded checkpoint of {}, but this run is {}. Shards are per pipeline stage and expert-parallel "
            "rank: convert it first, e.g.\n  moeforge convert {} CONVERTED_DIR --format sharded --set "
            "parallel.pipeline_model_parallel_size={} --set parallel.virtual_pipeline_model_parallel_size={} --set "
            "parallel.expert_model_parallel_size={}\nthen --load CONVERTED_DIR (or --format whole, which resumes on any "
            "layout).",
            dir, saved.describe(), run.describe(), dir, run.pp, run.vpp, run.ep);
}

ShardLayout read_shard_layout(const std::string& dir) {
  const json j = read_manifest(dir);
  const fs::path path = fs::path(dir) / files::kShardManifest;
  try {
    ShardLayout l;
    l.pp = j.at("pipeline_model_parallel_size").get<int64_t>();
    l.ep = j.at("expert_model_parallel_size").get<int64_t>();
    l.vpp = j.value("virtual_pipeline_model_parallel_size", int64_t{1});
    l.layers_per_stage = j.at("layers_per_stage").get<std::vector<int64_t>>();
    if (l.pp < 1 || l.ep < 1 || l.vpp < 1 || static_cast<int64_t>(l.layers_per_stage.size()) != l.pp) {
      damaged(path, fmt::format("inconsistent layout ({})", l.describe()));
    }
    return l;
  } catch (const json::exception& e) {
    damaged(path, fmt::format("unreadable ({})", e.what()));
  }
}

void write_shard(const std::string& dir, const ModelPartition& partition, int64_t stage, int64_t ep_rank,
                 const NamedTensors& model, const NamedTensors& optimizer, const torch::Tensor& rng) {
  const fs::path shard = fs::path(dir) / files::shard_dir(stage, ep_rank);
  fs::create_directories(shard);
  save_safetensors((shard / files::kSafetensors).string(), shard_part(model, partition, stage, ep_rank, false),
                   {{"format", "pt"}});
  NamedTensors opt = shard_part(optimizer, partition, stage, ep_rank, false);
  opt.emplace_back(files::kRngTensor, rng.defined() ? rng : at::detail::getDefaultCPUGenerator().get_state());
  save_safetensors((shard / files::kOptimizer).string(), opt, {{"format", "moeforge"}});
}

void write_shard_manifest(const std::string& dir, const ModelPartition& partition, const TensorShapes& optimizer) {
  const ShardLayout layout = ShardLayout::of(partition.layout());
  TensorShapes model;
  for (const auto& p : partition.parameters()) model[p.name] = p.shape;
  const json j = {{"format", "moeforge-sharded"},
                  {"pipeline_model_parallel_size", layout.pp},
                  {"expert_model_parallel_size", layout.ep},
                  {"virtual_pipeline_model_parallel_size", layout.vpp},
                  {"layers_per_stage", layout.layers_per_stage},
                  {"model", model},
                  {"optimizer", optimizer}};
  write_file_durably(fs::path(dir) / files::kShardManifest, j.dump(1) + "\n");
}

ShardReader::ShardReader(const std::string& dir, const ModelShard& shard) : partition_(shard.partition) {
  for (int64_t ep : {int64_t{0}, shard.at.ep}) {
    const fs::path path = fs::path(dir) / files::shard_dir(shard.at.pp, ep);
    if (!fs::exists(path / files::kSafetensors) || !fs::exists(path / files::kOptimizer)) {
      fail_user("{}: shard {} is missing or incomplete (expected {} and {}). The checkpoint is damaged: load another one.",
                dir, path.string(), files::kSafetensors, files::kOptimizer);
    }
    model_.emplace_back((path / files::kSafetensors).string());
    optimizer_.emplace_back((path / files::kOptimizer).string());
    if (shard.at.ep == 0) break;
  }
}

std::optional<torch::Tensor> ShardReader::model(const std::string& name) const {
  const auto& file = partition_.at(name).expert_parallel ? model_.back() : model_.front();
  if (!file.contains(name)) return std::nullopt;
  return floating_as_stored(file, name);
}

std::optional<torch::Tensor> ShardReader::optimizer(const std::string& name) const {
  const auto& file = partition_.at(name).expert_parallel ? optimizer_.back() : optimizer_.front();
  if (!file.contains(name)) return std::nullopt;
  return file.tensor_exactly(name, torch::kFloat32);
}

std::optional<torch::Tensor> ShardReader::rng() const {
  if (!optimizer_.back().contains(files::kRngTensor)) return std::nullopt;
  return optimizer_.back().tensor_exactly(files::kRngTensor, torch::kUInt8);
}

std::string ShardReader::describe() const {
  std::vector<std::string> dirs;
  for (const auto& f : model_) dirs.push_back(fs::path(f.path()).parent_path().string());
  return fmt::format("{}", fmt::join(dirs, " and "));
}

void load_shard_weights(const std::string& dir, model::GPTModelImpl& model, const ModelShard& shard) {
  check_shard_layout(dir, ShardLayout::of(shard.partition.layout()));
  const ShardReader reader(dir, shard);
  std::vector<std::string> problems;
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : shard.parameters(model)) {
    const auto from = reader.model(name);
    if (!from) {
      problems.push_back(name + " missing");
    } else if (from->sizes() != p.sizes()) {
      problems.push_back(fmt::format("{}: shard [{}], model [{}]", name, fmt::join(from->sizes(), ", "),
                                     fmt::join(p.sizes(), ", ")));
    } else {
      p.copy_(*from);
    }
  }
  if (!problems.empty()) {
    fail_user("{} does not match the configured model ({} problem{}):\n  - {}\nFix the config's model section or load "
              "another checkpoint.",
              reader.describe(), problems.size(), problems.size() > 1 ? "s" : "", fmt::join(problems, "\n  - "));
  }
}

CheckpointContents read_all_shards(const std::string& dir, const ModelPartition& saved_as) {
  const ShardLayout layout = read_shard_layout(dir);
  if (layout != ShardLayout::of(saved_as.layout())) {
    damaged(fs::path(dir) / files::kShardManifest,
            fmt::format("it records {}, but the checkpoint's config.yaml gives {}", layout.describe(),
                        ShardLayout::of(saved_as.layout()).describe()));
  }
  TensorShapes expected_model, expected_optimizer;
  try {
    const json j = read_manifest(dir);
    expected_model = j.at("model").get<TensorShapes>();
    expected_optimizer = j.at("optimizer").get<TensorShapes>();
  } catch (const json::exception& e) {
    damaged(fs::path(dir) / files::kShardManifest, fmt::format("unreadable ({})", e.what()));
  }
  std::vector<std::string> problems;
  CheckpointContents out;
  auto assemble = [&](const TensorShapes& expected, const char* file_name, NamedTensors& into) {
    // Open every shard's file once; note which of its tensors were used.
    std::map<std::pair<int64_t, int64_t>, SafetensorsFile> shard_files;
    std::set<std::pair<std::string, std::string>> used;  // (file, tensor)
    for (int64_t s = 0; s < layout.pp; ++s) {
      for (int64_t e = 0; e < layout.ep; ++e) {
        const fs::path p = fs::path(dir) / files::shard_dir(s, e) / file_name;
        if (!fs::exists(p)) fail_user("{}: shard file {} is missing. The checkpoint is incomplete: load another one.", dir, p.string());
        shard_files.emplace(std::pair{s, e}, SafetensorsFile(p.string()));
      }
    }
    for (const auto& [name, shape] : expected) {
      if (!saved_as.contains(name)) {
        problems.push_back(fmt::format("{} (in shards.json) is not part of the model config.yaml describes", name));
        continue;
      }
      const ParameterPlacement& where = saved_as.at(name);
      std::vector<torch::Tensor> parts;
      const int64_t holders = where.expert_parallel ? layout.ep : 1;
      for (int64_t e = 0; e < holders; ++e) {
        const auto& f = shard_files.at({where.stage, e});
        if (!f.contains(name)) {
          problems.push_back(fmt::format("{} missing from {}", name, f.path()));
          continue;
        }
        parts.push_back(floating_as_stored(f, name));
        used.emplace(f.path(), name);
      }
      if (parts.size() != static_cast<size_t>(holders)) continue;
      auto whole = parts.size() == 1 ? parts[0] : torch::cat(parts, 0);
      if (shape_of(whole) != shape) {
        problems.push_back(fmt::format("{}: shards give shape [{}], shards.json says [{}]", name,
                                       fmt::join(shape_of(whole), ", "), fmt::join(shape, ", ")));
        continue;
      }
      into.emplace_back(name, whole);
    }
    for (const auto& [key, f] : shard_files) {
      for (const auto& name : f.names()) {
        if (name != files::kRngTensor && !used.contains({f.path(), name})) {
          problems.push_back(fmt::format("{} in {} is not named in shards.json (or not in the shard it belongs to)", name,
                                         f.path()));
        }
      }
    }
    if (std::string(file_name) == files::kOptimizer && shard_files.at({0, 0}).contains(files::kRngTensor)) {
      out.rng = shard_files.at({0, 0}).tensor_exactly(files::kRngTensor, torch::kUInt8);
    }
  };
  assemble(expected_model, files::kSafetensors, out.model);
  assemble(expected_optimizer, files::kOptimizer, out.optimizer);
  if (!problems.empty()) {
    fail_user("{}: the shards do not assemble into the checkpoint shards.json describes ({} problem{}):\n  - {}\nNothing "
              "was converted.",
              dir, problems.size(), problems.size() > 1 ? "s" : "", fmt::join(problems, "\n  - "));
  }
  return out;
}

void write_all_shards(const std::string& dir, const ModelPartition& target, const CheckpointContents& contents) {
  const ShardLayout layout = ShardLayout::of(target.layout());  // refuses what it cannot shard, before anything is read
  TensorShapes optimizer;
  std::vector<std::string> problems;
  const int64_t experts = target.layout().experts_per_rank() * target.layout().ep();
  for (const NamedTensors* tensors : {&contents.model, &contents.optimizer}) {
    std::set<std::string> seen;
    for (const auto& [name, t] : *tensors) {
      if (!target.contains(name)) {
        problems.push_back(fmt::format("{}: not a tensor of the configured model", name));
        continue;
      }
      if (target.at(name).shape != shape_of(t)) {
        problems.push_back(fmt::format("{}: [{}], the model needs [{}]", name, fmt::join(shape_of(t), ", "),
                                       fmt::join(target.at(name).shape, ", ")));
      } else if (target.at(name).expert_parallel && t.size(0) != experts) {
        problems.push_back(fmt::format("{}: {} experts do not divide over EP {}", name, t.size(0), target.layout().ep()));
      }
      if (!seen.insert(name).second) problems.push_back(fmt::format("{} appears twice", name));
      if (tensors == &contents.optimizer) optimizer[name] = shape_of(t);
    }
  }
  if (!problems.empty()) {
    fail_user("cannot shard the checkpoint as {}:\n  - {}\nNothing was written.", layout.describe(),
              fmt::join(problems, "\n  - "));
  }
  for (int64_t s = 0; s < layout.pp; ++s) {
    for (int64_t e = 0; e < layout.ep; ++e) {
      write_shard(dir, target, s, e, shard_part(contents.model, target, s, e, true),
                  shard_part(contents.optimizer, target, s, e, true), contents.rng);
    }
  }
  write_shard_manifest(dir, target, optimizer);
}

}  // namespace moeforge
