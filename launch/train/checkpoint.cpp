#include "launch/train/checkpoint.h"

#include "core/config/config_loader.h"
#include "core/files/dir_lock.h"
#include "core/files/durable_file.h"
#include "core/files/replace_dir.h"
#include "core/base/errors.h"
#include "core/device/host_sync.h"
#include "core/files/safetensors.h"
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

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge {

namespace {


// Keeps the newest `keep` checkpoints at or below `current` (the one just saved). Checkpoints above
// it belong to a run this one resumed from an earlier point: they are left alone (and replaced as
// this run reaches their iterations), never counted against the one just saved.
void prune(const fs::path& save, int64_t keep, int64_t current) {
  std::vector<std::pair<int64_t, fs::path>> found;
  for (const auto& entry : fs::directory_iterator(save)) {
    if (!entry.is_directory()) continue;
    if (const auto it = checkpoint_iteration(entry.path()); it && *it <= current) found.emplace_back(*it, entry.path());
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = static_cast<size_t>(keep); keep > 0 && i < found.size(); ++i) {
    fs::remove_all(found[i].second);
    spdlog::info("removed old checkpoint {} (checkpoint.keep_latest_k = {})", found[i].second.string(), keep);
  }
}

}  // namespace

std::string checkpoint_tmp_dir(const std::string& save_dir, int64_t iteration, int64_t tag) {
  return (fs::path(save_dir) / fmt::format("{}.tmp-{}", files::iteration_dir(iteration), tag)).string();
}

std::string prepare_checkpoint_dir(const std::string& save_dir, int64_t iteration, int64_t tag) {
  const fs::path save(save_dir);
  fs::create_directories(save);
  // Leftovers of saves that were killed: never referenced by the tracker, safe to remove. Only
  // this process's and dead processes' (a live writer's temporary is never touched).
  remove_abandoned_temporaries(save);
  const std::string tmp = checkpoint_tmp_dir(save_dir, iteration, tag);
  fs::create_directories(tmp);
  return tmp;
}

void write_whole_checkpoint(const std::string& dir, const CheckpointContents& contents, const ExperimentConfig& config) {
  moe::save_hf_checkpoint(config.model, contents.model, dir);
  moe::copy_tokenizer(config.data.tokenizer_model, dir);  // the checkpoint is a hub model a reader can tokenize for
  NamedTensors opt = contents.optimizer;
  opt.emplace_back(files::kRngTensor, contents.rng.defined() ? contents.rng : at::detail::getDefaultCPUGenerator().get_state());
  save_safetensors((fs::path(dir) / files::kOptimizer).string(), opt, {{"format", "moeforge"}});
}

std::string commit_checkpoint(const std::string& save_dir, const std::string& tmp_dir, const TrainState& state,
                              int64_t optimizer_steps, const ExperimentConfig& config, int64_t keep_latest_k,
                              const json& extra) {
  const fs::path save(save_dir), tmp(tmp_dir);
  const fs::path final_dir = save / files::iteration_dir(state.iteration);
  json j = train_state_json(state, optimizer_steps, config.training.bf16);
  j["moeforge_version"] = MOEFORGE_VERSION;
  j.update(extra);
  write_file_durably(tmp / files::kTrainerState, j.dump(2) + "\n");
  write_file_durably(tmp / files::kResolvedConfig, resolved_config_yaml(config));
  // Every file was synced as it was written; the directories' entries are synced here.
  for (const auto& entry : fs::recursive_directory_iterator(tmp)) {
    if (entry.is_directory()) sync_path(entry.path());
  }
  sync_path(tmp);

  // Re-saving an iteration (a resumed run reaching it again) swaps the new copy in atomically: at
  // every moment `iter_N` is a complete checkpoint, the old or the new one. A kill after the move
  // and before the tracker's write: find_checkpoint resumes iter_N.
  replace_dir_durably(tmp, final_dir);
  sync_path(save);
  write_file_durably(save / files::kTracker, std::to_string(state.iteration) + "\n");
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

std::optional<fs::path> newest_untracked_checkpoint(const fs::path& save) {
  std::optional<std::pair<int64_t, fs::path>> newest;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(save, ec)) {
    const auto it = entry.is_directory(ec) ? checkpoint_iteration(entry.path()) : std::nullopt;
    if (!it || !fs::exists(entry.path() / files::kTrainerState) || !fs::exists(entry.path() / files::kResolvedConfig)) continue;
    if (!newest || *it > newest->first) newest.emplace(*it, entry.path());
  }
  if (!newest) return std::nullopt;
  return newest->second;
}

std::optional<CheckpointToLoad> find_checkpoint(const std::string& path) {
  const fs::path p(path);
  if (!fs::exists(p)) fail_user("checkpoint path {} does not exist", path);
  if (!fs::is_directory(p)) fail_user("checkpoint path {} is not a directory", path);
  if (fs::exists(p / files::kTrainerState)) return CheckpointToLoad{path, true};
  if (fs::exists(p / files::kTracker)) {
    recover_replaced_dirs(p, "iter_");  // an interrupted re-save of iter_N put back before reading
    std::ifstream in(p / files::kTracker);
    int64_t iteration = -1;
    if (!(in >> iteration) || iteration < 0) {
      fail_user("{}: expected an iteration number. Point --load at one iter_* directory instead.", (p / files::kTracker).string());
    }
    const fs::path dir = p / files::iteration_dir(iteration);
    if (!fs::exists(dir / files::kTrainerState)) {
      fail_user("{} names iteration {}, but {} is missing or incomplete. Point --load at another iter_* directory.",
                (p / files::kTracker).string(), iteration, dir.string());
    }
    return CheckpointToLoad{dir.string(), true};
  }
  if (fs::exists(p / files::kHfConfig)) return CheckpointToLoad{path, false};
  // A save directory whose tracker was never written (a kill between the first save's rename and
  // its tracker) or was lost: each iter_N in it is complete (renamed into place only when whole),
  // so the newest one is the checkpoint.
  if (const auto newest = newest_untracked_checkpoint(p)) {
    spdlog::warn("{} has no {}: resuming its newest complete checkpoint, {} (the next save writes the tracker)", path,
                 files::kTracker, newest->string());
    return CheckpointToLoad{newest->string(), true};
  }
  bool empty = true;
  for (const auto& entry : fs::directory_iterator(p)) {
    if (entry.path().filename() != files::kDirectoryLock) empty = false;
  }
  if (empty) return std::nullopt;
  fail_user("{} holds no checkpoint: expected {} (a save directory), {} (one training checkpoint) or config.json (a "
            "Hugging Face checkpoint)",
            path, files::kTracker, files::kTrainerState);
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
    // The routing as computed: Megatron's default (pre_softmax false) is pre-softmax routing with
    // renormalisation, which is what a Hugging Face config.json says of it. Only the expert bias,
    // which shifts the scores the top k is taken of, tells the two apart.
    auto routing = [](const ModelConfig& m) {
      const char* weights = moe::router_renormalizes(m) ? "top-k weights renormalised" : "top-k of the softmax over all experts";
      if (!m.moe_router_enable_expert_bias) return std::string(weights);
      return fmt::format("{}, bias added to the {}", weights, m.moe_router_pre_softmax ? "probabilities" : "logits");
    };
    cmp("router (moe_router_pre_softmax, moe_router_norm_topk_prob)", routing(a), routing(b));
    cmp("moe_router_enable_expert_bias", a.moe_router_enable_expert_bias, b.moe_router_enable_expert_bias);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

bool is_sharded_checkpoint(const std::string& dir) { return fs::exists(fs::path(dir) / files::kShardManifest); }

ModelConfig checkpoint_model_config(const std::string& dir) {
  // A training checkpoint's resolved config states the model exactly, whatever its config.json
  // says (before moeforge wrote its routing keys there, config.json misstated Megatron's default
  // routing); a Hugging Face checkpoint has only config.json.
  const fs::path resolved = fs::path(dir) / files::kResolvedConfig;
  if (is_sharded_checkpoint(dir) || (fs::exists(resolved) && fs::exists(fs::path(dir) / files::kTrainerState))) {
    return load_config(resolved.string()).config.model;
  }
  return moe::read_hf_config(dir);
}

std::vector<std::string> nonfinite_tensors(const CheckpointContents& contents) {
  std::vector<const std::pair<std::string, torch::Tensor>*> floating;
  for (const auto* set : {&contents.model, &contents.optimizer}) {
    for (const auto& entry : *set) {
      if (entry.second.is_floating_point() && entry.second.numel() > 0) floating.push_back(&entry);
    }
  }
  torch::Tensor all_finite;
  for (const auto* entry : floating) {
    const auto ok = torch::isfinite(entry->second).all();
    all_finite = all_finite.defined() ? all_finite.logical_and(ok) : ok;
  }
  std::vector<std::string> bad;
  if (!all_finite.defined() || to_host(all_finite).item<bool>()) return bad;
  for (const auto* entry : floating) {
    if (!to_host(torch::isfinite(entry->second).all()).item<bool>()) bad.push_back(entry->first);
  }
  return bad;
}

}  // namespace moeforge
