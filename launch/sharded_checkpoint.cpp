#include "launch/sharded_checkpoint.h"

#include "core/errors.h"
#include "moe/expert_parallel.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge {

namespace {

constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kRngName = "rng.cpu";

std::vector<int64_t> shape_of(const torch::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

std::string_view parameter_of(std::string_view name) {
  for (std::string_view prefix : {"exp_avg_sq.", "exp_avg.", "master."}) {
    if (name.starts_with(prefix)) return name.substr(prefix.size());
  }
  return name;
}

// The tensors of `all` that shard (stage, ep_rank) holds, experts cut to the shard's block when
// `cut_experts` (whole contents) or taken as they are (a rank's own, already local).
NamedTensors shard_part(const NamedTensors& all, const ShardLayout* layout, int64_t stage, int64_t ep_rank,
                        int64_t ep_size) {
  NamedTensors out;
  for (const auto& [name, t] : all) {
    if (layout && layout->stage_of(name) != stage) continue;
    const bool expert = moe::is_expert_parallel_parameter(name);
    if (!expert && ep_rank != 0) continue;
    out.emplace_back(name, expert && layout ? moe::local_experts(t, ep_rank, ep_size) : t);
  }
  return out;
}

}  // namespace

std::string ShardLayout::describe() const {
  return fmt::format("PP {} x EP {}, layers per stage [{}]", pp, ep, fmt::join(layers_per_stage, ", "));
}

int64_t ShardLayout::stage_of(std::string_view tensor_name) const {
  const std::string_view name = parameter_of(tensor_name);
  if (name.starts_with("layers.")) {
    const int64_t layer = std::stoll(std::string(name.substr(7)));
    for (int64_t s = 0, first = 0; s < pp; first += layers_per_stage[static_cast<size_t>(s)], ++s) {
      if (layer < first + layers_per_stage[static_cast<size_t>(s)]) return s;
    }
    fail_user("tensor {}: layer {} is beyond the {} layers of {}", tensor_name, layer,
              std::accumulate(layers_per_stage.begin(), layers_per_stage.end(), int64_t{0}), describe());
  }
  if (name.starts_with("embed_tokens.")) return 0;
  return pp - 1;
}

std::string shard_dir_name(int64_t stage, int64_t ep_rank) { return fmt::format("mp_rank_00_{:03d}_{:03d}", stage, ep_rank); }

bool is_sharded_checkpoint(const std::string& dir) { return fs::exists(fs::path(dir) / kShardManifestFile); }

void check_shard_layout(const std::string& dir, const ShardLayout& run) {
  const ShardLayout saved = read_shard_layout(dir);
  if (saved == run) return;
  fail_user("{} is a sharded checkpoint of {}, but this run is {}. Shards are per pipeline stage and expert-parallel "
            "rank: convert it first, e.g.\n  moeforge convert {} CONVERTED_DIR --format sharded --set "
            "parallel.pipeline_model_parallel_size={} --set parallel.expert_model_parallel_size={}\nthen --load "
            "CONVERTED_DIR (or --format whole, which resumes on any layout).",
            dir, saved.describe(), run.describe(), dir, run.pp, run.ep);
}

ShardLayout read_shard_layout(const std::string& dir) {
  const fs::path path = fs::path(dir) / kShardManifestFile;
  try {
    const json j = json::parse(std::ifstream(path));
    ShardLayout l;
    l.pp = j.at("pipeline_model_parallel_size").get<int64_t>();
    l.ep = j.at("expert_model_parallel_size").get<int64_t>();
    l.layers_per_stage = j.at("layers_per_stage").get<std::vector<int64_t>>();
    if (l.pp < 1 || l.ep < 1 || static_cast<int64_t>(l.layers_per_stage.size()) != l.pp) {
      fail_user("{}: inconsistent layout ({}). The checkpoint is damaged: load another one.", path.string(), l.describe());
    }
    return l;
  } catch (const json::exception& e) {
    fail_user("{}: unreadable ({}). The checkpoint is damaged: load another one.", path.string(), e.what());
  }
}

void write_shard(const std::string& dir, int64_t stage, int64_t ep_rank, const NamedTensors& model,
                 const NamedTensors& optimizer, const torch::Tensor& rng) {
  const fs::path shard = fs::path(dir) / shard_dir_name(stage, ep_rank);
  fs::create_directories(shard);
  save_safetensors((shard / kModelFile).string(), shard_part(model, nullptr, stage, ep_rank, 1), {{"format", "pt"}});
  NamedTensors opt = shard_part(optimizer, nullptr, stage, ep_rank, 1);
  opt.emplace_back(kRngName, rng.defined() ? rng : at::detail::getDefaultCPUGenerator().get_state());
  save_safetensors((shard / kOptimizerFile).string(), opt, {{"format", "moeforge"}});
}

void write_shard_manifest(const std::string& dir, const ShardLayout& layout, const TensorShapes& model,
                          const TensorShapes& optimizer) {
  const json j = {{"format", "moeforge-sharded"},
                  {"pipeline_model_parallel_size", layout.pp},
                  {"expert_model_parallel_size", layout.ep},
                  {"layers_per_stage", layout.layers_per_stage},
                  {"model", model},
                  {"optimizer", optimizer}};
  const fs::path path = fs::path(dir) / kShardManifestFile;
  std::ofstream out(path, std::ios::trunc);
  out << j.dump(1) << "\n";
  if (!out.flush()) fail_user("cannot write {} (disk full or read-only?)", path.string());
}

ShardReader::ShardReader(const std::string& dir, int64_t stage, int64_t ep_rank) {
  for (int64_t ep : {int64_t{0}, ep_rank}) {
    const fs::path shard = fs::path(dir) / shard_dir_name(stage, ep);
    if (!fs::exists(shard / kModelFile) || !fs::exists(shard / kOptimizerFile)) {
      fail_user("{}: shard {} is missing or incomplete (expected {} and {}). The checkpoint is damaged: load another one.",
                dir, shard.string(), kModelFile, kOptimizerFile);
    }
    model_.emplace_back((shard / kModelFile).string());
    optimizer_.emplace_back((shard / kOptimizerFile).string());
    if (ep_rank == 0) break;
  }
}

std::optional<torch::Tensor> ShardReader::model(const std::string& name) const {
  const auto& file = moe::is_expert_parallel_parameter(name) ? model_.back() : model_.front();
  if (!file.contains(name)) return std::nullopt;
  return file.tensor(name);
}

std::optional<torch::Tensor> ShardReader::optimizer(const std::string& name) const {
  const auto& file = moe::is_expert_parallel_parameter(name) ? optimizer_.back() : optimizer_.front();
  if (!file.contains(name)) return std::nullopt;
  return file.tensor(name, torch::kFloat32);
}

std::optional<torch::Tensor> ShardReader::rng() const {
  if (!optimizer_.back().contains(kRngName)) return std::nullopt;
  return optimizer_.back().tensor(kRngName);
}

std::string ShardReader::describe() const {
  std::vector<std::string> dirs;
  for (const auto& f : model_) dirs.push_back(fs::path(f.path()).parent_path().string());
  return fmt::format("{}", fmt::join(dirs, " and "));
}

CheckpointContents read_all_shards(const std::string& dir) {
  const ShardLayout layout = read_shard_layout(dir);
  const fs::path manifest_path = fs::path(dir) / kShardManifestFile;
  TensorShapes expected_model, expected_optimizer;
  try {
    const json j = json::parse(std::ifstream(manifest_path));
    expected_model = j.at("model").get<TensorShapes>();
    expected_optimizer = j.at("optimizer").get<TensorShapes>();
  } catch (const json::exception& e) {
    fail_user("{}: unreadable ({}). The checkpoint is damaged: load another one.", manifest_path.string(), e.what());
  }
  std::vector<std::string> problems;
  CheckpointContents out;
  auto assemble = [&](const TensorShapes& expected, const char* file_name, NamedTensors& into) {
    // Open every shard's file once; note which of its tensors were used.
    std::map<std::pair<int64_t, int64_t>, SafetensorsFile> files;
    std::set<std::pair<std::string, std::string>> used;  // (file, tensor)
    for (int64_t s = 0; s < layout.pp; ++s) {
      for (int64_t e = 0; e < layout.ep; ++e) {
        const fs::path p = fs::path(dir) / shard_dir_name(s, e) / file_name;
        if (!fs::exists(p)) fail_user("{}: shard file {} is missing. The checkpoint is incomplete: load another one.", dir, p.string());
        files.emplace(std::pair{s, e}, SafetensorsFile(p.string()));
      }
    }
    for (const auto& [name, shape] : expected) {
      const int64_t stage = layout.stage_of(name);
      const bool expert = moe::is_expert_parallel_parameter(name);
      std::vector<torch::Tensor> parts;
      for (int64_t e = 0; e < (expert ? layout.ep : 1); ++e) {
        const auto& f = files.at({stage, e});
        if (!f.contains(name)) {
          problems.push_back(fmt::format("{} missing from {}", name, f.path()));
          continue;
        }
        parts.push_back(f.tensor(name));
        used.emplace(f.path(), name);
      }
      if (parts.size() != static_cast<size_t>(expert ? layout.ep : 1)) continue;
      auto whole = parts.size() == 1 ? parts[0] : torch::cat(parts, 0);
      if (shape_of(whole) != shape) {
        problems.push_back(fmt::format("{}: shards give shape [{}], shards.json says [{}]", name,
                                       fmt::join(shape_of(whole), ", "), fmt::join(shape, ", ")));
        continue;
      }
      into.emplace_back(name, whole);
    }
    for (const auto& [key, f] : files) {
      for (const auto& name : f.names()) {
        if (name != kRngName && !used.contains({f.path(), name})) {
          problems.push_back(fmt::format("{} in {} is not named in shards.json (or not in the shard it belongs to)", name,
                                         f.path()));
        }
      }
    }
    if (std::string(file_name) == kOptimizerFile && files.at({0, 0}).contains(kRngName)) {
      out.rng = files.at({0, 0}).tensor(kRngName);
    }
  };
  assemble(expected_model, kModelFile, out.model);
  assemble(expected_optimizer, kOptimizerFile, out.optimizer);
  if (!problems.empty()) {
    fail_user("{}: the shards do not assemble into the checkpoint shards.json describes ({} problem{}):\n  - {}\nNothing "
              "was converted.",
              dir, problems.size(), problems.size() > 1 ? "s" : "", fmt::join(problems, "\n  - "));
  }
  return out;
}

void write_all_shards(const std::string& dir, const ShardLayout& layout, const CheckpointContents& contents) {
  TensorShapes model, optimizer;
  std::vector<std::string> problems;
  auto check = [&](const NamedTensors& tensors, TensorShapes& shapes) {
    for (const auto& [name, t] : tensors) {
      if (moe::is_expert_parallel_parameter(name) && (t.dim() == 0 || t.size(0) % layout.ep != 0)) {
        problems.push_back(fmt::format("{}: {} experts do not divide over EP {}", name, t.dim() ? t.size(0) : 0, layout.ep));
      }
      if (!shapes.emplace(name, shape_of(t)).second) problems.push_back(fmt::format("{} appears twice", name));
    }
  };
  check(contents.model, model);
  check(contents.optimizer, optimizer);
  if (!problems.empty()) {
    fail_user("cannot shard the checkpoint as {}:\n  - {}\nChoose an expert_model_parallel_size that divides the experts.",
              layout.describe(), fmt::join(problems, "\n  - "));
  }
  for (int64_t s = 0; s < layout.pp; ++s) {
    for (int64_t e = 0; e < layout.ep; ++e) {
      write_shard(dir, s, e, shard_part(contents.model, &layout, s, e, layout.ep),
                  shard_part(contents.optimizer, &layout, s, e, layout.ep), contents.rng);
    }
  }
  write_shard_manifest(dir, layout, model, optimizer);
}

}  // namespace moeforge
