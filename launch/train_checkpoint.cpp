#include "launch/train_checkpoint.h"

#include "core/config_loader.h"
#include "core/errors.h"
#include "core/safetensors.h"
#include "launch/sharded_checkpoint.h"
#include "moe/expert_parallel.h"
#include "moe/hf_checkpoint.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge {

namespace {

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kOldSuffix = ".old-";  // iter_N.old-<pid>: the previous iter_N while it is replaced

std::string iter_name(int64_t iteration) { return fmt::format("iter_{:07d}", iteration); }

void fsync_path(const fs::path& p, bool directory) {
  const int fd = ::open(p.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) fail_user("cannot open {} to sync it: {}", p.string(), std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) fail_user("fsync of {} failed: {}", p.string(), std::strerror(errno));
}

// Writes `text` to `path` through a synced temporary and a rename.
void write_file_atomic(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + fmt::format(".tmp-{}", ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    if (!out.flush()) fail_user("cannot write {} (disk full or read-only?)", tmp.string());
  }
  fsync_path(tmp, false);
  fs::rename(tmp, path);
  fsync_path(path.parent_path().empty() ? fs::path(".") : path.parent_path(), true);
}

std::optional<int64_t> iteration_of(const fs::path& dir) {
  static const std::regex re(R"(iter_(\d{7,}))");
  std::smatch m;
  const std::string name = dir.filename().string();
  if (!std::regex_match(name, m, re)) return std::nullopt;
  return std::stoll(m[1].str());
}

// Keeps the newest `keep` checkpoints at or below `current` (the one just saved). Checkpoints above
// it belong to a run this one resumed from an earlier point: they are left alone (and replaced as
// this run reaches their iterations), never counted against the one just saved.
void prune(const fs::path& save, int64_t keep, int64_t current) {
  std::vector<std::pair<int64_t, fs::path>> found;
  for (const auto& entry : fs::directory_iterator(save)) {
    if (!entry.is_directory()) continue;
    if (const auto it = iteration_of(entry.path()); it && *it <= current) found.emplace_back(*it, entry.path());
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = static_cast<size_t>(keep); keep > 0 && i < found.size(); ++i) {
    fs::remove_all(found[i].second);
    spdlog::info("removed old checkpoint {} (checkpoint.keep_latest_k = {})", found[i].second.string(), keep);
  }
}

// A kill between the two renames of a replacement without RENAME_EXCHANGE leaves iter_N missing
// and its complete old copy as iter_N.old-<pid>: put it back. Otherwise an old copy is garbage.
void recover_replaced(const fs::path& save) {
  for (const auto& entry : fs::directory_iterator(save)) {
    const std::string name = entry.path().filename().string();
    const auto at = name.find(kOldSuffix);
    if (at == std::string::npos) continue;
    const fs::path original = save / name.substr(0, at);
    if (fs::exists(original)) {
      fs::remove_all(entry.path());
    } else {
      fs::rename(entry.path(), original);
      spdlog::warn("restored {} from {} (a save replacing it was interrupted)", original.string(), entry.path().string());
    }
  }
}

}  // namespace

std::string checkpoint_tmp_dir(const std::string& save_dir, int64_t iteration, int64_t tag) {
  return (fs::path(save_dir) / fmt::format("{}.tmp-{}", iter_name(iteration), tag)).string();
}

std::string prepare_checkpoint_dir(const std::string& save_dir, int64_t iteration, int64_t tag) {
  const fs::path save(save_dir);
  fs::create_directories(save);
  // Leftovers of saves that were killed: never referenced by the tracker, safe to remove.
  recover_replaced(save);
  for (const auto& entry : fs::directory_iterator(save)) {
    if (entry.path().filename().string().find(".tmp-") != std::string::npos) fs::remove_all(entry.path());
  }
  const std::string tmp = checkpoint_tmp_dir(save_dir, iteration, tag);
  fs::create_directories(tmp);
  return tmp;
}

void write_whole_checkpoint(const std::string& dir, const CheckpointContents& contents, const ExperimentConfig& config) {
  moe::save_hf_checkpoint(config.model, contents.model, dir);
  NamedTensors opt = contents.optimizer;
  opt.emplace_back("rng.cpu", contents.rng.defined() ? contents.rng : at::detail::getDefaultCPUGenerator().get_state());
  save_safetensors((fs::path(dir) / kOptimizerFile).string(), opt, {{"format", "moeforge"}});
}

std::string commit_checkpoint(const std::string& save_dir, const std::string& tmp_dir, const TrainState& state,
                              int64_t optimizer_steps, const ExperimentConfig& config, int64_t keep_latest_k,
                              const json& extra) {
  const fs::path save(save_dir), tmp(tmp_dir);
  const fs::path final_dir = save / iter_name(state.iteration);
  json j = {{"iteration", state.iteration},
            {"consumed_train_samples", state.consumed_train_samples},
            {"consumed_valid_samples", state.consumed_valid_samples},
            {"lr_num_steps", state.lr_num_steps},
            {"optimizer_steps", optimizer_steps},
            {"skipped_iterations", state.skipped_iterations},
            {"bf16", config.training.bf16},
            {"moeforge_version", MOEFORGE_VERSION}};
  j.update(extra);
  write_file_atomic(tmp / kStateFile, j.dump(2) + "\n");
  write_file_atomic(tmp / "config.yaml", resolved_config_yaml(config));
  for (const auto& entry : fs::recursive_directory_iterator(tmp)) fsync_path(entry.path(), entry.is_directory());
  fsync_path(tmp, true);

  // Re-saving an iteration (a resumed run reaching it again) swaps the new copy in atomically: at
  // every moment `iter_N` is a complete checkpoint, the old or the new one.
  if (fs::exists(final_dir)) {
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) != 0) {
      // A file system without RENAME_EXCHANGE: two renames; recover_replaced() repairs a kill between them.
      const fs::path old = save / fmt::format("{}{}{}", iter_name(state.iteration), kOldSuffix, ::getpid());
      fs::rename(final_dir, old);
      fs::rename(tmp, final_dir);
      fs::remove_all(old);
    } else {
      fs::remove_all(tmp);  // now the old copy
    }
  } else {
    fs::rename(tmp, final_dir);
  }
  fsync_path(save, true);
  write_file_atomic(save / kTrackerFile, std::to_string(state.iteration) + "\n");
  prune(save, keep_latest_k, state.iteration);
  return final_dir.string();
}

std::string save_checkpoint(const std::string& save_dir, const TrainState& state, const CheckpointContents& contents,
                            const ExperimentConfig& config, int64_t keep_latest_k) {
  const std::string tmp = prepare_checkpoint_dir(save_dir, state.iteration, ::getpid());
  write_whole_checkpoint(tmp, contents, config);
  return commit_checkpoint(save_dir, tmp, state, contents.optimizer_steps, config, keep_latest_k,
                           {{"format", "whole"}});
}

std::optional<CheckpointToLoad> find_checkpoint(const std::string& path) {
  const fs::path p(path);
  if (!fs::exists(p)) fail_user("checkpoint path {} does not exist", path);
  if (!fs::is_directory(p)) fail_user("checkpoint path {} is not a directory", path);
  if (fs::exists(p / kStateFile)) return CheckpointToLoad{path, true};
  if (fs::exists(p / kTrackerFile)) {
    recover_replaced(p);
    std::ifstream in(p / kTrackerFile);
    int64_t iteration = -1;
    if (!(in >> iteration) || iteration < 0) {
      fail_user("{}: expected an iteration number. Point --load at one iter_* directory instead.", (p / kTrackerFile).string());
    }
    const fs::path dir = p / iter_name(iteration);
    if (!fs::exists(dir / kStateFile)) {
      fail_user("{} names iteration {}, but {} is missing or incomplete. Point --load at another iter_* directory.",
                (p / kTrackerFile).string(), iteration, dir.string());
    }
    return CheckpointToLoad{dir.string(), true};
  }
  if (fs::exists(p / "config.json")) return CheckpointToLoad{path, false};
  bool empty = true;
  for (const auto& entry : fs::directory_iterator(p)) {
    (void)entry;
    empty = false;
  }
  if (empty) return std::nullopt;
  fail_user("{} holds no checkpoint: expected {} (a save directory), {} (one training checkpoint) or config.json (a "
            "Hugging Face checkpoint)",
            path, kTrackerFile, kStateFile);
}

std::vector<std::string> backbone_config_differences(const ModelConfig& a, const ModelConfig& b, const std::string& label) {
  std::vector<std::string> out;
  auto cmp = [&](const char* name, const auto& x, const auto& y) {
    if (x != y) out.push_back(fmt::format("model.{}: {} {}, config {}", name, label, x, y));
  };
  cmp("num_layers", a.num_layers, b.num_layers);
  cmp("hidden_size", a.hidden_size, b.hidden_size);
  cmp("num_attention_heads", a.num_attention_heads, b.num_attention_heads);
  cmp("num_query_groups", *a.num_query_groups, *b.num_query_groups);
  cmp("kv_channels", *a.kv_channels, *b.kv_channels);
  cmp("padded vocab size", a.padded_vocab_size(), b.padded_vocab_size());
  cmp("add_qkv_bias", a.add_qkv_bias, b.add_qkv_bias);
  cmp("untie_embeddings_and_output_weights", a.untie_embeddings_and_output_weights, b.untie_embeddings_and_output_weights);
  // Values that change the function but not the shapes: loading would silently train another model.
  cmp("rotary_base", a.rotary_base, b.rotary_base);
  cmp("norm_epsilon", a.norm_epsilon, b.norm_epsilon);
  return out;
}

std::vector<std::string> model_config_differences(const ModelConfig& a, const ModelConfig& b) {
  std::vector<std::string> out = backbone_config_differences(a, b);
  auto cmp = [&](const char* name, const auto& x, const auto& y) {
    if (x != y) out.push_back(fmt::format("model.{}: checkpoint {}, config {}", name, x, y));
  };
  cmp("num_experts", a.num_experts.value_or(0), b.num_experts.value_or(0));
  cmp("moe_shared_expert_intermediate_size", a.moe_shared_expert_intermediate_size.value_or(0),
      b.moe_shared_expert_intermediate_size.value_or(0));
  cmp("moe_shared_expert_gate", a.moe_shared_expert_gate, b.moe_shared_expert_gate);
  for (int64_t l = 0; l < std::min(a.num_layers, b.num_layers); ++l) {
    const bool moe_a = a.is_moe() && a.is_moe_layer(l), moe_b = b.is_moe() && b.is_moe_layer(l);
    if (moe_a != moe_b) {
      out.push_back(fmt::format("layer {}: checkpoint {}, config {}", l, moe_a ? "MoE" : "dense", moe_b ? "MoE" : "dense"));
      continue;
    }
    if (moe_a) {
      cmp("moe_ffn_hidden_size", *a.moe_ffn_hidden_size, *b.moe_ffn_hidden_size);
    } else {
      cmp("ffn_hidden_size", *a.ffn_hidden_size, *b.ffn_hidden_size);
    }
  }
  if (a.is_moe() && b.is_moe()) {
    cmp("moe_router_topk", a.moe_router_topk, b.moe_router_topk);
    cmp("moe_router_norm_topk_prob", a.moe_router_norm_topk_prob, b.moe_router_norm_topk_prob);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

void load_model_weights(const std::string& dir, model::GPTModelImpl& model) {
  const auto loaded = moe::load_hf_checkpoint(dir);
  const auto diffs = model_config_differences(loaded.config, model.config());
  if (!diffs.empty()) {
    fail_user("{} holds a different model than the config describes ({} difference{}):\n  - {}\nFix the config's model "
              "section or load another checkpoint.",
              dir, diffs.size(), diffs.size() > 1 ? "s" : "", fmt::join(diffs, "\n  - "));
  }
  torch::NoGradGuard no_grad;
  const auto source = loaded.model->named_parameters();
  for (auto& item : model.named_parameters()) {
    const auto* from = source.find(item.key());
    if (from == nullptr || from->sizes() != item.value().sizes()) {
      fail_user("{}: tensor {} does not match the configured model", dir, item.key());  // unreachable after the diff
    }
    item.value().copy_(*from);
  }
}

SavedTrainState read_train_state(const std::string& dir) {
  const fs::path p(dir);
  std::ifstream in(p / kStateFile);
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail_user("{}: unreadable ({}). Point --load at another checkpoint.", (p / kStateFile).string(), e.what());
  }
  SavedTrainState out;
  TrainState& s = out.state;
  try {
    s.iteration = j.at("iteration").get<int64_t>();
    s.consumed_train_samples = j.at("consumed_train_samples").get<int64_t>();
    s.consumed_valid_samples = j.at("consumed_valid_samples").get<int64_t>();
    s.lr_num_steps = j.at("lr_num_steps").get<int64_t>();
    s.skipped_iterations = j.at("skipped_iterations").get<int64_t>();
    out.optimizer_steps = j.at("optimizer_steps").get<int64_t>();
    out.bf16 = j.value("bf16", false);
  } catch (const json::exception& e) {
    fail_user("{}: {}", (p / kStateFile).string(), e.what());
  }
  return out;
}

TrainState load_training_state(const std::string& dir, Optimizer& optimizer, bool bf16, const ShardPosition& at) {
  const SavedTrainState saved = read_train_state(dir);
  if (saved.bf16 != bf16) {
    fail_user("{} was trained with training.bf16 = {}, this config says {}: a resumed run keeps its precision. Set "
              "training.bf16: {}.",
              dir, saved.bf16, bf16, saved.bf16);
  }
  torch::Tensor rng;
  if (is_sharded_checkpoint(dir)) {
    const ShardReader shard(dir, at.stage, at.ep_rank);
    optimizer.load_state([&](const std::string& name) { return shard.optimizer(name); }, shard.describe(),
                         saved.optimizer_steps);
    if (auto r = shard.rng()) rng = *r;
  } else {
    const SafetensorsFile opt((fs::path(dir) / kOptimizerFile).string());
    optimizer.load_state(
        [&](const std::string& name) -> std::optional<torch::Tensor> {
          if (!opt.contains(name)) return std::nullopt;
          auto t = opt.tensor(name, torch::kFloat32);
          if (at.ep_size > 1 && moe::is_expert_parallel_parameter(name)) {
            if (t.dim() == 0 || t.size(0) % at.ep_size != 0) return t;  // reported as mis-shaped
            t = moe::local_experts(t, at.ep_rank, at.ep_size);
          }
          return t;
        },
        opt.path(), saved.optimizer_steps);
    if (opt.contains("rng.cpu")) rng = opt.tensor("rng.cpu");
  }
  if (rng.defined()) {
    auto generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(rng);
  }
  return saved.state;
}

}  // namespace moeforge
