#include "launch/commands/upcycle_command.h"

#include "core/config/config_loader.h"
#include "core/files/dir_lock.h"
#include "core/files/durable_file.h"
#include "core/files/replace_dir.h"
#include "core/base/errors.h"
#include "core/model/rule_updated.h"
#include "core/files/safetensors.h"
#include "launch/train/checkpoint.h"
#include "moe/hf_checkpoint.h"
#include "moe/moe_layer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge {

namespace {

const char* method_name(moe::UpcycleMethod m) {
  switch (m) {
    case moe::UpcycleMethod::copy: return "copy";
    case moe::UpcycleMethod::split: return "split";
    case moe::UpcycleMethod::granular: return "granular";
    case moe::UpcycleMethod::fine_grained: return "fine_grained";
  }
  return "?";
}

// Warm boot: layer l's router from another MoE checkpoint (its config.json says its family).
torch::Tensor warm_router(const std::string& dir, const ModelConfig& moe, int64_t layer) {
  static std::map<std::string, std::pair<ModelConfig, std::shared_ptr<SafetensorsCheckpoint>>> cache;
  auto it = cache.find(dir);
  if (it == cache.end()) {
    const auto cfg = moe::read_hf_config(dir);
    if (!cfg.is_moe()) fail_user("--router-from {}: a dense model; warm boot takes the routers of an MoE checkpoint", dir);
    it = cache.emplace(dir, std::pair{cfg, std::make_shared<SafetensorsCheckpoint>(dir)}).first;
  }
  const auto& [cfg, ckpt] = it->second;
  const std::string name = moe::hub_tensor_name(fmt::format("layers.{}.mlp.gate.weight", layer), cfg.model_type);
  if (!ckpt->contains(name)) {
    fail_user("--router-from {}: no router for layer {} ({} is missing); it has {} layers", dir, layer, name, cfg.num_layers);
  }
  auto t = ckpt->tensor(name, torch::kFloat32);
  if (t.sizes() != torch::IntArrayRef{*moe.num_experts, moe.hidden_size}) {
    fail_user("--router-from {}: {} is [{}], this MoE needs [{}, {}] (num_experts x hidden_size)", dir, name,
              fmt::join(t.sizes(), ", "), *moe.num_experts, moe.hidden_size);
  }
  return t;
}

void copy_tokenizer_files(const fs::path& from, const fs::path& to) {
  for (const auto& entry : fs::directory_iterator(from)) {
    const std::string name = entry.path().filename().string();
    if (name.starts_with("tokenizer") || name == "vocab.json" || name == "merges.txt" ||
        name == "special_tokens_map.json" || name == "generation_config.json") {
      std::ifstream in(entry.path(), std::ios::binary);
      write_file_durably(to / name, std::string(std::istreambuf_iterator<char>(in), {}));
    }
  }
}

// The output directory is written whole or not at all. The checkpoint is built beside it as
// `<to>.tmp-<pid>` (one file system, so renames are atomic) and renamed into place once complete:
// `to` holds, at every moment, what it held before or the whole new checkpoint, never a mix.
fs::path output_dir(const std::string& to) {
  const fs::path p = fs::absolute(to).lexically_normal();
  return p.has_filename() ? p : p.parent_path();  // "out/" names out
}

fs::path sibling(const fs::path& to, const std::string& suffix) {
  return to.parent_path() / (to.filename().string() + suffix + std::to_string(::getpid()));
}

// An existing directory is replaced only with --overwrite. An empty one is taken as it is: it
// holds nothing to lose, and `mkdir` (or a job script's fresh directory) often comes first.
void refuse_to_replace(const fs::path& to, const std::string& from, bool overwrite) {
  std::error_code ec;
  if (fs::equivalent(to, from, ec)) {
    fail_user("--to {} is the dense checkpoint --from reads. Name another directory for the MoE.", to.string());
  }
  if (!fs::exists(to)) return;
  if (!fs::is_directory(to)) {
    fail_user("--to {} is a file, not a directory. Name a directory for the upcycled checkpoint.", to.string());
  }
  if (!overwrite && !fs::is_empty(to)) {
    fail_user("--to {} already exists and is not empty: upcycle would replace what it holds. Name a new directory, "
              "or pass --overwrite to replace it (the old contents are removed only once the new checkpoint is "
              "complete).",
              to.string());
  }
}

// What a killed upcycle into `to` left beside it: the old checkpoint of an interrupted
// replacement (put back, core/files/replace_dir.h) and its unfinished `<to>.tmp-<pid>` (removed).
// Only names of `to` ending in the pid of a process that is gone: a live upcycle's, or anything
// else in the user's directory, stays.
void recover_leftovers(const fs::path& to) {
  recover_replaced_dirs(to.parent_path(), to.filename().string() + ".old");
  const std::string prefix = to.filename().string() + std::string(kTempInfix);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(to.parent_path(), ec)) {
    const std::string name = entry.path().filename().string();
    const std::string pid = name.substr(std::min(prefix.size(), name.size()));
    if (name.starts_with(prefix) && !pid.empty() && pid.find_first_not_of("0123456789") == std::string::npos &&
        is_abandoned_temporary(name)) {
      fs::remove_all(entry.path());
    }
  }
}

// Removes a directory at the end of its scope: the unfinished checkpoint after an error, the
// replaced one after an exchange; after a plain rename there is nothing left to remove.
struct RemovedAtExit {
  fs::path dir;
  ~RemovedAtExit() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

// Puts the complete checkpoint `tmp` at `to`, whole (core/files/replace_dir.h).
void put_in_place(const fs::path& tmp, const fs::path& to, const std::string& from, bool overwrite) {
  refuse_to_replace(to, from, overwrite);  // again: `to` may have changed while upcycle ran
  replace_dir_durably(tmp, to);
}

}  // namespace

int run_upcycle(const UpcycleCommandOptions& o) {
  // Before any work: a refusal after minutes of upcycling would waste them.
  const fs::path to = output_dir(o.to);
  recover_leftovers(to);
  refuse_to_replace(to, o.from, o.overwrite);
  // Only the model section matters: upcycling trains nothing.
  LoadedConfig loaded = load_config(o.config_path, o.overrides, ConfigUse::model_only);
  ModelConfig& mc = loaded.config.model;
  if (!mc.is_moe()) {
    fail_user("{}: model.num_experts is not set: upcycle builds the MoE the config's model section describes "
              "(num_experts, moe_ffn_hidden_size, moe_router_topk, ...).",
              o.config_path);
  }
  if (mc.model_type != ModelType::qwen2_moe && mc.model_type != ModelType::mixtral) {
    fail_user("{}: model.model_type must be qwen2_moe or mixtral for an upcycled checkpoint", o.config_path);
  }
  if (o.upcycle.reinit_fraction < 0 || o.upcycle.reinit_fraction > 1) {
    fail_user("--reinit-fraction {}: expected a value in [0, 1]", o.upcycle.reinit_fraction);
  }
  auto dense = moe::load_hf_checkpoint(o.from);
  if (dense.config.is_moe()) fail_user("--from {} is already an MoE checkpoint; upcycle starts from a dense model", o.from);
  // Without a training section the positions come from the dense model (the MoE reads the same text).
  if (!mc.max_position_embeddings) mc.max_position_embeddings = dense.config.max_position_embeddings;
  if (const auto diffs = backbone_config_differences(dense.config, mc, "dense checkpoint"); !diffs.empty()) {
    fail_user("--from {} and {} describe different models outside the MLPs:\n  - {}\nMake the config's model section "
              "match the dense checkpoint.",
              o.from, o.config_path, fmt::join(diffs, "\n  - "));
  }
  const SafetensorsCheckpoint dense_files(o.from);
  const auto stored_dtype = dense_files.info(dense_files.names().front()).scalar_type;
  spdlog::info("upcycling {} ({} layers, dense FFN {}) into {} x {} experts, top-{}, method {}", o.from,
               dense.config.num_layers, *dense.config.ffn_hidden_size, *mc.num_experts, *mc.moe_ffn_hidden_size,
               mc.moe_router_topk, method_name(o.upcycle.method));

  std::map<std::string, torch::Tensor> source;
  for (const auto& item : dense.model->named_parameters()) source[item.key()] = item.value().detach();
  std::set<std::string> used;
  auto take = [&](const std::string& name) {
    used.insert(name);
    return source.at(name);
  };
  auto moe_model = moe::build_model(mc);
  model::materialize(*moe_model, torch::TensorOptions().dtype(torch::kFloat32));
  std::map<std::string, torch::Tensor> built;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(o.upcycle.seed);
  std::vector<int64_t> random_rows;
  for (int64_t l = 0; l < mc.num_layers; ++l) {
    const std::string p = fmt::format("layers.{}.mlp.", l);
    if (!mc.is_moe_layer(l)) continue;  // a dense layer of the MoE keeps the dense MLP (same names)
    const moe::DenseMLP mlp{take(p + "gate_proj.weight"), take(p + "up_proj.weight"), take(p + "down_proj.weight")};
    auto u = moe::upcycle_layer(mlp, mc, o.upcycle, generator);
    random_rows.push_back(u.random_rows);
    built[p + "experts.gate_up_proj"] = u.gate_up_E2FD;
    built[p + "experts.down_proj"] = u.down_EDF;
    built[p + "gate.weight"] = o.upcycle.router_from.empty() ? u.router_ED : warm_router(o.upcycle.router_from, mc, l);
    if (u.shared) {
      built[p + "shared_expert.gate_proj.weight"] = u.shared->gate_ID;
      built[p + "shared_expert.up_proj.weight"] = u.shared->up_ID;
      built[p + "shared_expert.down_proj.weight"] = u.shared->down_DI;
    }
    if (u.shared_gate_1D.defined()) built[p + "shared_expert_gate.weight"] = u.shared_gate_1D;
    if (mc.moe_router_enable_expert_bias) built[p + "gate.expert_bias"] = torch::zeros({*mc.num_experts});
  }
  // Every MoE tensor from the construction above or, unchanged, from the dense model; every dense
  // tensor used. Anything else is a mismatch to report, not to skip.
  std::vector<std::string> problems;
  NamedTensors out;
  {
    torch::NoGradGuard no_grad;
    for (auto& item : moe_model->named_parameters()) {
      const std::string& name = item.key();
      torch::Tensor t;
      if (built.contains(name)) {
        t = built.at(name);
      } else if (source.contains(name)) {
        t = take(name);
      } else {
        problems.push_back(name + ": neither built nor in the dense checkpoint");
        continue;
      }
      if (t.sizes() != item.value().sizes()) {
        problems.push_back(fmt::format("{}: [{}], the MoE needs [{}]", name, fmt::join(t.sizes(), ", "),
                                       fmt::join(item.value().sizes(), ", ")));
        continue;
      }
      item.value().copy_(t);
      out.emplace_back(name, item.value().detach().to(is_rule_updated(name) ? torch::kFloat32 : stored_dtype));
    }
  }
  for (const auto& [name, t] : source) {
    if (!used.contains(name)) problems.push_back(name + ": a dense tensor the MoE has no place for");
  }
  if (!problems.empty()) {
    fail_user("upcycling {} with {} does not account for every tensor ({} problem{}):\n  - {}\nNothing was written.", o.from,
              o.config_path, problems.size(), problems.size() > 1 ? "s" : "", fmt::join(problems, "\n  - "));
  }

  bool verified = true;
  if (o.verify) verified = verify_upcycled(*dense.model, *moe_model, mc, o.upcycle);

  const fs::path tmp = sibling(to, ".tmp-");
  const RemovedAtExit cleanup{tmp};
  fs::create_directories(tmp);
  moe::save_hf_checkpoint(mc, out, tmp.string());
  copy_tokenizer_files(o.from, tmp);
  const json manifest = {
      {"method", method_name(o.upcycle.method)},
      {"seed", o.upcycle.seed},
      {"source", fs::absolute(o.from).string()},
      {"config", fs::absolute(o.config_path).string()},
      {"dense_intermediate_size", *dense.config.ffn_hidden_size},
      {"num_experts", *mc.num_experts},
      {"moe_ffn_hidden_size", *mc.moe_ffn_hidden_size},
      {"moe_router_topk", mc.moe_router_topk},
      {"shared_expert_intermediate_size", mc.moe_shared_expert_intermediate_size.value_or(0)},
      {"split_order", o.upcycle.random_split ? "random" : "contiguous"},
      {"granularity", o.upcycle.granularity},
      {"scale", moe::default_scale(o.upcycle)},
      {"reinit_fraction", o.upcycle.reinit_fraction},
      {"shared_init", o.upcycle.shared_init == moe::SharedExpertInit::dense ? "dense" : "random"},
      {"router", o.upcycle.router_from.empty() ? json{{"init", "random"}, {"std", o.upcycle.router_std}}
                                               : json{{"init", "warm_boot"}, {"from", fs::absolute(o.upcycle.router_from).string()}}},
      {"random_rows_per_moe_layer", random_rows},
      {"moeforge_version", MOEFORGE_VERSION},
  };
  write_file_durably(tmp / files::kUpcycleManifest, manifest.dump(2) + "\n");
  sync_path(tmp);
  const bool replaced = fs::exists(to) && !fs::is_empty(to);
  put_in_place(tmp, to, o.from, o.overwrite);
  spdlog::info("{} {} ({} tensors; manifest {}); train from it with --load {}", replaced ? "replaced" : "wrote", o.to,
               out.size(), files::kUpcycleManifest, o.to);
  return verified ? 0 : 1;
}

}  // namespace moeforge
