#include "moe/hf_checkpoint.h"

#include "core/files/durable_file.h"
#include "core/base/errors.h"
#include "core/model/rule_updated.h"
#include "core/files/safetensors.h"
#include "moe/moe_layer.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>

namespace moeforge::moe {

namespace fs = std::filesystem;

namespace {

// Our parameter name -> the hub's, for the non-expert tensors.
std::string hub_name(const std::string& ours, ModelType type) {
  if (ours == "lm_head.weight") return ours;
  std::string name = "model." + ours;
  if (type == ModelType::mixtral) {
    static const std::regex mlp(R"(^model\.layers\.(\d+)\.mlp\.)");
    name = std::regex_replace(name, mlp, "model.layers.$1.block_sparse_moe.");
  }
  return name;
}

// The hub names of expert e's gate, up and down projections in layer `layer`.
std::array<std::string, 3> expert_names(int64_t layer, int64_t e, ModelType type) {
  if (type == ModelType::mixtral) {
    const auto p = fmt::format("model.layers.{}.block_sparse_moe.experts.{}.", layer, e);
    return {p + "w1.weight", p + "w3.weight", p + "w2.weight"};
  }
  const auto p = fmt::format("model.layers.{}.mlp.experts.{}.", layer, e);
  return {p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"};
}

bool is_experts(const std::string& ours, int64_t* layer, bool* gate_up) {
  static const std::regex re(R"(^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$)");
  std::smatch m;
  if (!std::regex_match(ours, m, re)) return false;
  *layer = std::stoll(m[1]);
  *gate_up = m[2] == "gate_up_proj";
  return true;
}

std::string shape_str(c10::IntArrayRef s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

}  // namespace

HFModel load_hf_checkpoint(const std::string& dir, torch::ScalarType dtype) {
  HFModel out;
  out.config = read_hf_config(dir);
  out.model = build_model(out.config);
  model::materialize(*out.model, torch::TensorOptions().dtype(torch::kFloat32));
  load_hf_weights(dir, *out.model);
  out.model->to(dtype);
  return out;
}

void load_hf_weights(const std::string& dir, model::GPTModelImpl& model, const FirstExpert& first_expert,
                     const TensorPart& part) {
  const ModelConfig& c = model.config();
  const SafetensorsCheckpoint ckpt(dir);
  const ModelType type = c.model_type;
  const int64_t F = c.moe_ffn_hidden_size.value_or(0), D = c.hidden_size;

  // The hub tensors of one of our parameters, with their whole shapes, from the whole model's
  // structure (built on the meta device: no memory).
  const auto whole = build_model(c);
  std::map<std::string, std::vector<int64_t>> expected;  // hub name -> shape
  for (const auto& item : whole->named_parameters()) {
    int64_t layer = 0;
    bool gate_up = false;
    if (is_experts(item.key(), &layer, &gate_up)) {
      for (int64_t e = 0; e < *c.num_experts; ++e) {
        const auto names = expert_names(layer, e, type);
        if (gate_up) {
          expected[names[0]] = {F, D};
          expected[names[1]] = {F, D};
        } else {
          expected[names[2]] = {D, F};
        }
      }
    } else {
      expected[hub_name(item.key(), type)] = item.value().sizes().vec();
    }
  }
  std::vector<std::string> missing, unexpected, misshaped;
  for (const auto& [name, shape] : expected) {
    if (!ckpt.contains(name)) {
      missing.push_back(name);
    } else if (ckpt.info(name).shape != shape) {
      misshaped.push_back(fmt::format("{} is {} in the checkpoint, the model needs {}", name, shape_str(ckpt.info(name).shape),
                                      shape_str(shape)));
    }
  }
  for (const auto& name : ckpt.names()) {
    if (expected.contains(name)) continue;
    // A tied head may be stored too; it must then equal the embedding it is tied to.
    if (name == "lm_head.weight" && !c.untie_embeddings_and_output_weights && ckpt.contains("model.embed_tokens.weight") &&
        torch::equal(ckpt.tensor(name, torch::kFloat32), ckpt.tensor("model.embed_tokens.weight", torch::kFloat32))) {
      continue;
    }
    unexpected.push_back(name);
  }
  if (!missing.empty() || !unexpected.empty() || !misshaped.empty()) {
    std::string msg = fmt::format("{} does not match the model its config.json describes:", dir);
    if (!missing.empty()) msg += fmt::format("\n  missing ({}): {}", missing.size(), fmt::join(missing, ", "));
    if (!unexpected.empty()) msg += fmt::format("\n  unexpected ({}): {}", unexpected.size(), fmt::join(unexpected, ", "));
    if (!misshaped.empty()) msg += fmt::format("\n  wrong shape ({}): {}", misshaped.size(), fmt::join(misshaped, "; "));
    fail_user("{}", msg);
  }

  torch::NoGradGuard no_grad;
  auto read = [&](const std::string& name) { return ckpt.tensor(name, torch::kFloat32); };
  for (auto& item : model.named_parameters()) {
    auto& p = item.value();
    if (p.numel() == 0) continue;
    int64_t layer = 0;
    bool gate_up = false;
    if (!is_experts(item.key(), &layer, &gate_up)) {
      const auto stored = read(hub_name(item.key(), type));
      p.copy_(part ? part(item.key(), stored) : stored);
      continue;
    }
    const int64_t first = first_expert ? first_expert(item.key()) : 0;
    auto expert = [&](int64_t e) {
      const auto names = expert_names(layer, first + e, type);
      return gate_up ? torch::cat({read(names[0]), read(names[1])}, 0) : read(names[2]);
    };
    if (part) {
      // This rank's experts whole, then its part of them.
      std::vector<torch::Tensor> experts;
      for (int64_t e = 0; e < p.size(0); ++e) experts.push_back(expert(e));
      p.copy_(part(item.key(), torch::stack(experts)));
      continue;
    }
    for (int64_t e = 0; e < p.size(0); ++e) p[e].copy_(expert(e));
  }
}

std::string hub_tensor_name(const std::string& ours, ModelType type) { return hub_name(ours, type); }

void copy_tokenizer(const std::string& tokenizer_json, const std::string& dir) {
  if (tokenizer_json.empty() || tokenizer_json == "byte") return;
  const fs::path from(tokenizer_json);
  if (!fs::is_regular_file(from)) {
    // The checkpoint is whole without it (a convert on another machine may not see the file).
    spdlog::warn("{}: data.tokenizer_model {} is not a file here, so the checkpoint holds no tokenizer.json", dir, tokenizer_json);
    return;
  }
  auto copy = [&](const fs::path& source, const char* name) {
    std::ifstream in(source, std::ios::binary);
    if (!in) fail_user("cannot copy the tokenizer {} into {}: it cannot be read (data.tokenizer_model names it)", source.string(), dir);
    write_file_durably(fs::path(dir) / name, std::string(std::istreambuf_iterator<char>(in), {}));
  };
  copy(from, "tokenizer.json");
  for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"}) {
    if (fs::exists(from.parent_path() / name)) copy(from.parent_path() / name, name);
  }
}

void save_hf_checkpoint(const model::GPTModelImpl& model, const std::string& dir) {
  NamedTensors params;
  for (const auto& item : model.named_parameters()) params.emplace_back(item.key(), item.value().detach());
  save_hf_checkpoint(model.config(), params, dir);
}

void save_hf_checkpoint(const ModelConfig& c, const NamedTensors& params, const std::string& dir) {
  NamedTensors tensors;
  torch::ScalarType dtype = torch::kFloat32;
  for (const auto& [name, value] : params) {
    const auto p = value.detach();
    if (!is_rule_updated(name)) dtype = p.scalar_type();  // the weights' precision (a bias stays fp32)
    int64_t layer = 0;
    bool gate_up = false;
    if (is_experts(name, &layer, &gate_up)) {
      for (int64_t e = 0; e < p.size(0); ++e) {
        const auto names = expert_names(layer, e, c.model_type);
        if (gate_up) {
          const auto halves = p[e].chunk(2, 0);
          tensors.emplace_back(names[0], halves[0].contiguous());
          tensors.emplace_back(names[1], halves[1].contiguous());
        } else {
          tensors.emplace_back(names[2], p[e].contiguous());
        }
      }
      continue;
    }
    tensors.emplace_back(hub_name(name, c.model_type), p.contiguous());
  }
  // Once per process and setting: a training run saves many checkpoints of one model.
  static std::set<std::string> warned;
  for (const auto& d : hf_export_differences(c)) {
    if (warned.insert(d).second) {
      spdlog::warn("{}: the Hugging Face config.json cannot express {}. moeforge's own keys in it keep the setting (moeforge "
                   "reads the checkpoint as trained), but a Hugging Face reader computes another model.", dir, d);
    }
  }
  fs::create_directories(dir);
  save_safetensors_checkpoint(dir, tensors);
  const char* dtype_name = dtype == torch::kBFloat16 ? "bfloat16" : "float32";
  write_file_durably(fs::path(dir) / "config.json", hf_config_from_model(c, dtype_name).dump(2) + "\n");
}

}  // namespace moeforge::moe
