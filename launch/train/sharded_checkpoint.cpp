#include "launch/train/sharded_checkpoint.h"

#include "core/config/config_loader.h"
#include "core/files/durable_file.h"
#include "core/base/errors.h"
#include "moe/moe_layer.h"

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

// Rows [begin, begin + count) along dim 0 of tensor `name` of `file`, in its stored dtype, reading
// only those bytes: a resharded load keeps a few experts of a saved block, and need not copy the
// block. The rows of a C-order tensor are contiguous; the data section follows the 8-byte
// little-endian header length and the header (the format, core/files/safetensors.h).
torch::Tensor read_rows(const SafetensorsFile& file, const std::string& name, int64_t begin, int64_t count) {
  const auto& info = file.info(name);
  if (begin == 0 && count == info.shape.at(0)) return file.tensor(name);
  std::ifstream in(file.path(), std::ios::binary);
  unsigned char length[8] = {};
  in.read(reinterpret_cast<char*>(length), sizeof length);
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | length[i];
  const auto row_bytes = static_cast<std::streamoff>((info.end - info.begin) / static_cast<size_t>(info.shape[0]));
  std::vector<int64_t> shape = info.shape;
  shape[0] = count;
  torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(info.scalar_type));  // host: read from the file
  in.seekg(static_cast<std::streamoff>(8 + header + info.begin) + begin * row_bytes);
  in.read(static_cast<char*>(t.data_ptr()), count * row_bytes);
  if (!in) fail_user("{}: cannot read rows [{}, {}) of tensor {}: the file is truncated. Load another checkpoint.",
                     file.path(), begin, begin + count, name);
  return t;
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

ModelPartition shard_partition(const ExperimentConfig& c) {
  const int64_t world = c.parallel.world_size.value_or(c.parallel.pipeline_model_parallel_size *
                                                       c.parallel.expert_model_parallel_size);
  const ParallelLayout layout = ParallelLayout::create(c, world);
  auto model = moe::build_model(c.model);
  return ModelPartition(*model, layout);
}

ModelPartition saved_partition(const std::string& dir) {
  const fs::path config = fs::path(dir) / files::kResolvedConfig;
  if (!fs::exists(config)) damaged(config, "missing: without it the shards' layout cannot be read");
  ModelPartition saved = shard_partition(load_config(config.string()).config);
  const ShardLayout manifest = read_shard_layout(dir);
  if (manifest != ShardLayout::of(saved.layout())) {
    damaged(fs::path(dir) / files::kShardManifest,
            fmt::format("it records {}, but the checkpoint's config.yaml gives {}", manifest.describe(),
                        ShardLayout::of(saved.layout()).describe()));
  }
  return saved;
}

void check_shards_loadable(const std::string& dir, const ParallelLayout& run) {
  const ShardLayout saved = read_shard_layout(dir);
  if (run.tp() > 1) {
    fail_user("{} is a sharded checkpoint ({}), and shards are not split over tensor-parallel ranks: this run "
              "(parallel.tensor_model_parallel_size {}) cannot read them. Convert it to a whole checkpoint, which "
              "resumes on any layout:\n  moeforge convert {} WHOLE_DIR --format whole\nthen --load WHOLE_DIR.",
              dir, saved.describe(), run.tp(), dir);
  }
}

std::optional<std::string> describe_reshard(const std::string& dir, const ParallelLayout& run) {
  const ShardLayout saved = read_shard_layout(dir), now = ShardLayout::of(run);
  if (saved == now) return std::nullopt;
  return fmt::format("resharded {} on load from {} to {}: each rank reads its stage's tensors and its experts' rows "
                     "from the saved shards",
                     dir, saved.describe(), now.describe());
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

ShardFiles::ShardFiles(std::string dir, ModelPartition saved_as) : dir_(std::move(dir)), saved_(std::move(saved_as)) {}

const SafetensorsFile& ShardFiles::file(int64_t stage, int64_t ep_rank, bool optimizer) const {
  const auto key = std::tuple{stage, ep_rank, optimizer};
  if (auto it = files_.find(key); it != files_.end()) return it->second;
  const fs::path path = fs::path(dir_) / files::shard_dir(stage, ep_rank) / (optimizer ? files::kOptimizer : files::kSafetensors);
  if (!fs::exists(path)) {
    fail_user("{}: shard file {} is missing. The checkpoint is incomplete: load another one.", dir_, path.string());
  }
  return files_.emplace(key, SafetensorsFile(path.string())).first->second;
}

std::optional<torch::Tensor> ShardFiles::read(const std::string& name, bool optimizer, int64_t first, int64_t count,
                                              std::vector<std::string>& problems) const {
  const ParameterPlacement& where = saved_.at(name);
  // A dense tensor is EP rank 0's; an expert weight is in blocks of `per_rank` experts, block b in
  // EP rank b's shard.
  const int64_t per_rank = where.expert_parallel ? saved_.layout().experts_per_rank() : 0;
  std::vector<std::tuple<int64_t, int64_t, int64_t>> pieces;  // (EP rank, first row, rows)
  if (!where.expert_parallel) {
    pieces.emplace_back(0, 0, -1);
  } else {
    for (int64_t e = first; e < first + count;) {
      const int64_t block = e / per_rank, row = e - block * per_rank;
      const int64_t rows = std::min(per_rank - row, first + count - e);
      pieces.emplace_back(block, row, rows);
      e += rows;
    }
  }
  std::vector<torch::Tensor> parts;
  for (const auto& [ep_rank, row, rows] : pieces) {
    const SafetensorsFile& f = file(where.stage, ep_rank, optimizer);
    if (!f.contains(name)) {
      problems.push_back(fmt::format("{} missing from {}", name, f.path()));
      continue;
    }
    const auto& info = f.info(name);
    // Stored as saved: weights in a floating type, optimizer state in fp32; anything else is damage.
    if (optimizer ? info.scalar_type != torch::kFloat32 : !c10::isFloatingType(info.scalar_type)) {
      problems.push_back(fmt::format("{} in {} is stored as {}, not {}", name, f.path(), info.dtype,
                                     optimizer ? "F32" : "a floating type"));
      continue;
    }
    if (where.expert_parallel && (info.shape.empty() || info.shape[0] != per_rank)) {
      problems.push_back(fmt::format("{} in {} holds {} experts, its layout gives each EP rank {}", name, f.path(),
                                     info.shape.empty() ? 0 : info.shape[0], per_rank));
      continue;
    }
    read_.emplace(f.path(), name);
    parts.push_back(rows < 0 ? f.tensor(name) : read_rows(f, name, row, rows));
  }
  if (parts.size() != pieces.size()) return std::nullopt;
  return parts.size() == 1 ? parts[0] : torch::cat(parts, 0);
}

std::vector<std::string> ShardFiles::unread() const {
  std::vector<std::string> out;
  for (const auto& [key, f] : files_) {
    for (const auto& name : f.names()) {
      if (name != files::kRngTensor && !read_.contains({f.path(), name})) out.push_back(fmt::format("{} in {}", name, f.path()));
    }
  }
  return out;
}

namespace {

// The partition a reader of `dir` at `shard`'s layout reads it as: its own when the layouts agree
// (no config to load), else the one it was saved with.
ModelPartition partition_to_read(const std::string& dir, const ModelShard& shard, const ShardLayout& saved) {
  return saved == ShardLayout::of(shard.partition.layout()) ? shard.partition : saved_partition(dir);
}

}  // namespace

ShardReader::ShardReader(const std::string& dir, const ModelShard& shard)
    : shard_(shard),
      saved_layout_(read_shard_layout(dir)),
      resharded_(saved_layout_ != ShardLayout::of(shard.partition.layout())),
      files_(dir, partition_to_read(dir, shard, saved_layout_)) {}

std::optional<torch::Tensor> ShardReader::read(const std::string& name, bool optimizer) const {
  const ParameterPlacement& mine = shard_.partition.at(name);
  const int64_t experts = shard_.partition.layout().experts_per_rank() * shard_.partition.layout().ep();
  const int64_t first = mine.expert_parallel ? shard_.partition.first_expert(shard_.at.ep) : 0;
  const int64_t count = mine.expert_parallel ? shard_.partition.layout().experts_per_rank() : experts;
  std::vector<std::string> problems;
  auto t = files_.read(name, optimizer, first, count, problems);
  if (!problems.empty()) {
    fail_user("{}: cannot read {}:\n  - {}\nThe checkpoint is damaged or incomplete: load another one.", describe(), name,
              fmt::join(problems, "\n  - "));
  }
  return t;
}

std::optional<torch::Tensor> ShardReader::model(const std::string& name) const { return read(name, false); }

std::optional<torch::Tensor> ShardReader::optimizer(const std::string& name) const { return read(name, true); }

std::optional<torch::Tensor> ShardReader::rng() const {
  const SafetensorsFile& f = resharded_ ? files_.file(0, 0, true) : files_.file(shard_.at.pp, shard_.at.ep, true);
  if (!f.contains(files::kRngTensor)) return std::nullopt;
  return f.tensor_exactly(files::kRngTensor, torch::kUInt8);
}

std::string ShardReader::describe() const {
  if (resharded_) return fmt::format("{} (sharded as {})", files_.dir(), saved_layout_.describe());
  std::vector<std::string> dirs;
  for (int64_t ep : {int64_t{0}, shard_.at.ep}) {
    dirs.push_back((fs::path(files_.dir()) / files::shard_dir(shard_.at.pp, ep)).string());
    if (shard_.at.ep == 0) break;
  }
  return fmt::format("{}", fmt::join(dirs, " and "));
}

void load_shard_weights(const std::string& dir, model::GPTModelImpl& model, const ModelShard& shard) {
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

CheckpointContents read_all_shards(const std::string& dir) {
  const ShardFiles shards(dir, saved_partition(dir));
  const ShardLayout layout = ShardLayout::of(shards.saved_as().layout());
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
  const ModelPartition& saved_as = shards.saved_as();
  const int64_t experts = saved_as.layout().experts_per_rank() * saved_as.layout().ep();
  auto assemble = [&](const TensorShapes& expected, bool optimizer, NamedTensors& into) {
    // Every shard's file is opened, so that a tensor no read takes (one shards.json does not name,
    // or one in the wrong shard) is found in any of them.
    for (int64_t s = 0; s < layout.pp; ++s) {
      for (int64_t e = 0; e < layout.ep; ++e) shards.file(s, e, optimizer);
    }
    for (const auto& [name, shape] : expected) {
      if (!saved_as.contains(name)) {
        problems.push_back(fmt::format("{} (in shards.json) is not part of the model config.yaml describes", name));
        continue;
      }
      auto whole = shards.read(name, optimizer, 0, experts, problems);
      if (!whole) continue;
      if (shape_of(*whole) != shape) {
        problems.push_back(fmt::format("{}: shards give shape [{}], shards.json says [{}]", name,
                                       fmt::join(shape_of(*whole), ", "), fmt::join(shape, ", ")));
        continue;
      }
      into.emplace_back(name, *whole);
    }
  };
  assemble(expected_model, false, out.model);
  assemble(expected_optimizer, true, out.optimizer);
  for (const auto& stray : shards.unread()) {
    problems.push_back(stray + " is not named in shards.json (or not in the shard it belongs to)");
  }
  if (shards.file(0, 0, true).contains(files::kRngTensor)) {
    out.rng = shards.file(0, 0, true).tensor_exactly(files::kRngTensor, torch::kUInt8);
  }
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
