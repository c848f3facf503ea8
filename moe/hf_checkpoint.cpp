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
using nlohmann::json;

namespace {

// Our key in config.json for the router's expert bias (tensor `mlp.gate.expert_bias` of each MoE
// layer). transformers' Qwen2-MoE and Mixtral have no such bias: they load such a checkpoint with
// the tensor reported unexpected and route without it.
constexpr const char* kExpertBiasKey = "moe_router_enable_expert_bias";
// moeforge's own keys beside the hub's, for what the hub's config cannot say: the router as
// trained (pre-softmax or not, renormalised or not, which the hub's one norm_topk_prob flag folds
// together), a capacity factor, a shared expert without a gate, a Mixtral with a shared expert.
// Read back, they make a checkpoint describe the model that was trained, so a resume or a convert
// compares it exactly; readers that do not know them ignore them.
constexpr const char* kPreSoftmaxKey = "moe_router_pre_softmax";
constexpr const char* kNormTopkKey = "moe_router_norm_topk_prob";
constexpr const char* kCapacityKey = "moe_expert_capacity_factor";
constexpr const char* kSharedSizeKey = "moe_shared_expert_intermediate_size";
constexpr const char* kSharedGateKey = "moe_shared_expert_gate";

template <typename T>
T get(const json& j, const char* key, const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) fail_user("{}: config.json has no \"{}\"", path, key);
  try {
    return j[key].get<T>();
  } catch (const json::exception&) {
    fail_user("{}: config.json \"{}\" has the wrong type ({})", path, key, j[key].dump());
  }
}

double rope_theta(const json& j, const std::string& path) {
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const auto& r = j["rope_parameters"];
    if (r.value("rope_type", "default") != "default") {
      fail_user("{}: rope_type \"{}\" is not supported; only the default RoPE is", path, r["rope_type"].get<std::string>());
    }
    return get<double>(r, "rope_theta", path);
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) fail_user("{}: rope_scaling is not supported", path);
  return j.value("rope_theta", 10000.0);
}

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

bool router_renormalizes(const ModelConfig& c) { return !c.moe_router_pre_softmax || c.moe_router_norm_topk_prob; }

std::vector<std::string> hf_export_differences(const ModelConfig& c) {
  std::vector<std::string> out;
  if (!c.is_moe()) return out;
  const std::string family = c.model_type == ModelType::mixtral ? "Mixtral" : "Qwen2-MoE";
  if (c.model_type == ModelType::mixtral && !router_renormalizes(c)) {
    out.push_back("model.moe_router_pre_softmax: true with moe_router_norm_topk_prob: false (the top-k weights are not "
                  "renormalised); transformers' Mixtral always renormalises them");
  }
  if (c.moe_router_enable_expert_bias) {
    out.push_back(fmt::format("model.moe_router_enable_expert_bias: transformers' {} has no expert bias; it chooses the "
                              "top-k experts without it (the mlp.gate.expert_bias tensors are left unused)",
                              family));
  }
  if (c.moe_expert_capacity_factor) {
    out.push_back(fmt::format("model.moe_expert_capacity_factor: {}: transformers' {} drops no tokens; it runs every "
                              "token through its experts", *c.moe_expert_capacity_factor, family));
  }
  if (c.moe_shared_expert_intermediate_size && c.model_type == ModelType::mixtral) {
    out.push_back("model.moe_shared_expert_intermediate_size: transformers' Mixtral has no shared expert; it ignores the "
                  "shared_expert tensors");
  } else if (c.moe_shared_expert_intermediate_size && !c.moe_shared_expert_gate) {
    out.push_back("model.moe_shared_expert_gate: false: transformers' Qwen2-MoE always gates its shared expert with "
                  "sigmoid(shared_expert_gate), a weight this checkpoint lacks (it is initialised at random)");
  }
  return out;
}

ModelConfig model_config_from_hf(const json& j, const std::string& path) {
  ModelConfig c;
  const auto type = j.value("model_type", "");
  if (type == "qwen2_moe") c.model_type = ModelType::qwen2_moe;
  else if (type == "mixtral") c.model_type = ModelType::mixtral;
  else if (type == "qwen2") c.model_type = ModelType::qwen2;
  else if (type == "llama") c.model_type = ModelType::llama;
  else fail_user("{}: model_type \"{}\" is not supported; moeforge reads qwen2_moe, mixtral, qwen2 and llama", path, type);
  if (j.value("hidden_act", "silu") != "silu") fail_user("{}: hidden_act must be silu (SwiGLU)", path);
  c.num_layers = get<int64_t>(j, "num_hidden_layers", path);
  c.hidden_size = get<int64_t>(j, "hidden_size", path);
  c.num_attention_heads = get<int64_t>(j, "num_attention_heads", path);
  c.num_query_groups = j.value("num_key_value_heads", c.num_attention_heads);
  c.kv_channels = j.contains("head_dim") && !j["head_dim"].is_null() ? j["head_dim"].get<int64_t>()
                                                                     : c.hidden_size / c.num_attention_heads;
  c.vocab_size = get<int64_t>(j, "vocab_size", path);
  c.make_vocab_size_divisible_by = 1;  // the checkpoint's embedding is already as large as it is
  c.max_position_embeddings = get<int64_t>(j, "max_position_embeddings", path);
  c.rotary_base = rope_theta(j, path);
  c.norm_epsilon = get<double>(j, "rms_norm_eps", path);
  c.untie_embeddings_and_output_weights = !j.value("tie_word_embeddings", false);
  c.init_method_std = j.value("initializer_range", 0.02);
  c.ffn_hidden_size = get<int64_t>(j, "intermediate_size", path);
  switch (c.model_type) {
    case ModelType::qwen2_moe: {
      c.add_qkv_bias = j.value("qkv_bias", true);
      c.num_experts = get<int64_t>(j, "num_experts", path);
      c.moe_ffn_hidden_size = get<int64_t>(j, "moe_intermediate_size", path);
      c.moe_router_topk = get<int64_t>(j, "num_experts_per_tok", path);
      c.moe_router_pre_softmax = true;
      c.moe_router_norm_topk_prob = j.value("norm_topk_prob", false);
      const auto shared = j.value("shared_expert_intermediate_size", int64_t{0});
      if (shared > 0) {
        c.moe_shared_expert_intermediate_size = shared;
        c.moe_shared_expert_gate = true;
      }
      const auto step = j.value("decoder_sparse_step", int64_t{1});
      const auto dense = j.value("mlp_only_layers", std::vector<int64_t>{});
      for (int64_t i = 0; i < c.num_layers; ++i) {
        const bool moe = std::find(dense.begin(), dense.end(), i) == dense.end() && (i + 1) % step == 0;
        c.moe_layer_freq.pattern.push_back(moe ? 1 : 0);
      }
      break;
    }
    case ModelType::mixtral:
      c.num_experts = get<int64_t>(j, "num_local_experts", path);
      c.moe_ffn_hidden_size = c.ffn_hidden_size;
      c.moe_router_topk = get<int64_t>(j, "num_experts_per_tok", path);
      c.moe_router_pre_softmax = true;
      c.moe_router_norm_topk_prob = true;
      break;
    case ModelType::qwen2: c.add_qkv_bias = true; break;
    case ModelType::llama:
      c.add_qkv_bias = j.value("attention_bias", false);
      if (j.value("mlp_bias", false)) fail_user("{}: mlp_bias is not supported", path);
      break;
  }
  if (c.is_moe()) {
    c.moe_router_load_balancing_type = LoadBalancingType::hf_pooled_aux_loss;
    c.moe_aux_loss_coeff = j.value("router_aux_loss_coef", 0.0);
    c.moe_router_enable_expert_bias = j.value(kExpertBiasKey, false);
    // A checkpoint moeforge wrote says how it routed; the hub's keys above are what a reader
    // without these computes.
    c.moe_router_pre_softmax = j.value(kPreSoftmaxKey, c.moe_router_pre_softmax);
    c.moe_router_norm_topk_prob = j.value(kNormTopkKey, c.moe_router_norm_topk_prob);
    if (j.contains(kCapacityKey) && !j[kCapacityKey].is_null()) c.moe_expert_capacity_factor = get<double>(j, kCapacityKey, path);
    if (c.model_type == ModelType::mixtral && j.value(kSharedSizeKey, int64_t{0}) > 0) {
      c.moe_shared_expert_intermediate_size = get<int64_t>(j, kSharedSizeKey, path);
    }
    if (c.moe_shared_expert_intermediate_size) c.moe_shared_expert_gate = j.value(kSharedGateKey, c.model_type == ModelType::qwen2_moe);
  }
  return c;
}

json hf_config_from_model(const ModelConfig& c, torch::ScalarType dtype) {
  json j = {{"hidden_act", "silu"},
            {"hidden_size", c.hidden_size},
            {"num_hidden_layers", c.num_layers},
            {"num_attention_heads", c.num_attention_heads},
            {"num_key_value_heads", *c.num_query_groups},
            {"head_dim", c.head_dim()},
            {"vocab_size", c.padded_vocab_size()},
            {"max_position_embeddings", *c.max_position_embeddings},
            {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", c.rotary_base}}},
            {"rope_theta", c.rotary_base},  // where readers before rope_parameters look
            {"rms_norm_eps", c.norm_epsilon},
            {"tie_word_embeddings", !c.untie_embeddings_and_output_weights},
            {"initializer_range", c.init_method_std},
            {"intermediate_size", *c.ffn_hidden_size},
            {"dtype", dtype == torch::kBFloat16 ? "bfloat16" : "float32"},
            {"attention_dropout", 0.0}};
  if (c.is_moe()) {
    j[kPreSoftmaxKey] = c.moe_router_pre_softmax;
    j[kNormTopkKey] = c.moe_router_norm_topk_prob;
    if (c.moe_expert_capacity_factor) j[kCapacityKey] = *c.moe_expert_capacity_factor;
    if (c.moe_shared_expert_intermediate_size) {
      j[kSharedSizeKey] = *c.moe_shared_expert_intermediate_size;
      j[kSharedGateKey] = c.moe_shared_expert_gate;
    }
  }
  switch (c.model_type) {
    case ModelType::qwen2_moe: {
      j["model_type"] = "qwen2_moe";
      j["architectures"] = {"Qwen2MoeForCausalLM"};
      j["qkv_bias"] = c.add_qkv_bias;
      j["num_experts"] = *c.num_experts;
      j["moe_intermediate_size"] = *c.moe_ffn_hidden_size;
      j["num_experts_per_tok"] = c.moe_router_topk;
      // The hub's router takes the softmax over all experts, then the top k, renormalised when
      // norm_topk_prob: Megatron's default (top k of the logits, softmax over those k) is that
      // with renormalisation.
      j["norm_topk_prob"] = router_renormalizes(c);
      j["shared_expert_intermediate_size"] = c.moe_shared_expert_intermediate_size.value_or(0);
      j["decoder_sparse_step"] = 1;
      std::vector<int64_t> dense;
      for (int64_t i = 0; i < c.num_layers; ++i) {
        if (!c.is_moe_layer(i)) dense.push_back(i);
      }
      j["mlp_only_layers"] = dense;
      j["router_aux_loss_coef"] = c.moe_aux_loss_coeff;
      if (c.moe_router_enable_expert_bias) j[kExpertBiasKey] = true;
      break;
    }
    case ModelType::mixtral:
      j["model_type"] = "mixtral";
      j["architectures"] = {"MixtralForCausalLM"};
      j["num_local_experts"] = *c.num_experts;
      j["intermediate_size"] = *c.moe_ffn_hidden_size;
      j["num_experts_per_tok"] = c.moe_router_topk;
      j["router_aux_loss_coef"] = c.moe_aux_loss_coeff;
      if (c.moe_router_enable_expert_bias) j[kExpertBiasKey] = true;
      break;
    case ModelType::qwen2:
      j["model_type"] = "qwen2";
      j["architectures"] = {"Qwen2ForCausalLM"};
      break;
    case ModelType::llama:
      j["model_type"] = "llama";
      j["architectures"] = {"LlamaForCausalLM"};
      j["attention_bias"] = c.add_qkv_bias;
      j["mlp_bias"] = false;
      break;
  }
  return j;
}

ModelConfig read_hf_config(const std::string& dir) {
  const fs::path config_path = fs::path(dir) / "config.json";
  std::ifstream in(config_path);
  if (!in) fail_user("{}: not found; a Hugging Face checkpoint directory holds config.json and *.safetensors", config_path.string());
  try {
    return model_config_from_hf(json::parse(in), config_path.string());
  } catch (const json::exception& e) {
    fail_user("{}: invalid JSON: {}", config_path.string(), e.what());
  }
}

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
  write_file_durably(fs::path(dir) / "config.json", hf_config_from_model(c, dtype).dump(2) + "\n");
}

}  // namespace moeforge::moe
