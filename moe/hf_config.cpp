#include "moe/hf_config.h"

#include "core/base/errors.h"
#include "core/config/config_validate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>

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

// A JSON value as a message shows it: a scalar as written (a long string cut short), a list or an
// object by its kind only (dumping one would recurse as deep as the file nests).
std::string describe(const json& v) {
  constexpr size_t kShown = 40;
  switch (v.type()) {
    case json::value_t::array: return "a list";
    case json::value_t::object: return "an object";
    case json::value_t::string: {
      const auto& s = v.get_ref<const std::string&>();
      const auto shown = json(s.substr(0, kShown)).dump(-1, ' ', false, json::error_handler_t::replace);
      return fmt::format("{}{} (a string)", shown, s.size() > kShown ? "..." : "");
    }
    case json::value_t::boolean: return fmt::format("{} (a boolean)", v.get<bool>());
    default: return v.dump();
  }
}

// One JSON object's keys, read strictly: a key holds its type or the read fails naming the file
// and the key (`prefix` + key). Absent and null are alike (the hub writes null for "not set").
// nlohmann's own get<int64_t> would truncate 128.7 to 128 and its value() throw type errors that
// name no key.
class Reader {
 public:
  Reader(const json& object, const std::string& path, std::string prefix = "")
      : object_(object), path_(path), prefix_(std::move(prefix)) {}

  const json* find(const char* key) const {
    const auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const char* key) const { return find(key) != nullptr; }
  std::string name(const char* key) const { return prefix_ + key; }
  const std::string& path() const { return path_; }

  int64_t integer(const char* key) const { return integer_of(name(key), required(key)); }
  int64_t integer(const char* key, int64_t fallback) const {
    const json* v = find(key);
    return v ? integer_of(name(key), *v) : fallback;
  }
  double number(const char* key) const { return number_of(key, required(key)); }
  double number(const char* key, double fallback) const {
    const json* v = find(key);
    return v ? number_of(key, *v) : fallback;
  }
  bool boolean(const char* key, bool fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    if (!v->is_boolean()) wrong_type(name(key), *v, "true or false");
    return v->get<bool>();
  }
  std::string text(const char* key, const std::string& fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    if (!v->is_string()) wrong_type(name(key), *v, "a string");
    return v->get<std::string>();
  }
  // A list of integers; empty when absent.
  std::vector<int64_t> integers(const char* key) const {
    const json* v = find(key);
    if (!v) return {};
    if (!v->is_array()) wrong_type(name(key), *v, "a list of integers");
    std::vector<int64_t> out;
    for (size_t i = 0; i < v->size(); ++i) out.push_back(integer_of(fmt::format("{}[{}]", name(key), i), (*v)[i]));
    return out;
  }
  // A nested object's reader; nullopt when absent.
  std::optional<Reader> object(const char* key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_object()) wrong_type(name(key), *v, "an object");
    return Reader(*v, path_, name(key) + ".");
  }

 private:
  const json& required(const char* key) const {
    if (const json* v = find(key)) return *v;
    fail_user("{}: \"{}\" is missing: add it (moeforge assumes no default for it)", path_, name(key));
  }
  [[noreturn]] void wrong_type(const std::string& key, const json& v, const char* expected) const {
    fail_user("{}: \"{}\" must be {}, got {}", path_, key, expected, describe(v));
  }
  int64_t integer_of(const std::string& key, const json& v) const {
    if (!v.is_number_integer()) wrong_type(key, v, "an integer (a JSON number without a fraction or exponent, not quoted)");
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail_user("{}: \"{}\" is {}, beyond 64-bit integers: check it for a typo", path_, key, v.dump());
    }
    return v.get<int64_t>();
  }
  double number_of(const char* key, const json& v) const {
    if (!v.is_number()) wrong_type(name(key), v, "a number");
    const auto x = v.get<double>();
    if (!std::isfinite(x)) fail_user("{}: \"{}\" is {}, beyond a double's range: use a finite number", path_, name(key), v.dump());
    return x;
  }

  const json& object_;
  const std::string& path_;
  std::string prefix_;
};

// RoPE's base: transformers v5 writes rope_parameters {rope_type, rope_theta}; older files a
// top-level rope_theta (default 10000) and, for scaled RoPE, rope_scaling. moeforge implements
// only the default RoPE.
double rope_theta(const Reader& r) {
  if (const auto params = r.object("rope_parameters")) {
    if (const auto type = params->text("rope_type", "default"); type != "default") {
      fail_user("{}: \"rope_parameters.rope_type\" is {}: moeforge implements only the default RoPE", r.path(),
                describe(json(type)));
    }
    return params->number("rope_theta");
  }
  if (r.has("rope_scaling")) fail_user("{}: \"rope_scaling\" is set: moeforge implements only the default RoPE", r.path());
  return r.number("rope_theta", 10000.0);
}

// Qwen2-MoE's MoE layers: layer i (from 0) is MoE when (i + 1) % decoder_sparse_step == 0 and i is
// not in mlp_only_layers. Invalid values are added to `problems`; the pattern is then empty (the
// model's default, every layer MoE), so that no loop runs on them.
std::vector<int64_t> qwen2_moe_layers(const Reader& r, int64_t num_layers, std::vector<std::string>& problems) {
  const int64_t step = r.integer("decoder_sparse_step", 1);
  if (step < 1) problems.push_back(fmt::format("decoder_sparse_step must be positive (every k-th layer is MoE), got {}", step));
  const auto dense = r.integers("mlp_only_layers");
  // Out of this range model_config_problems reports num_hidden_layers.
  const bool layers_valid = num_layers >= 1 && num_layers <= kMaxModelLayers;
  std::vector<int64_t> pattern(layers_valid ? static_cast<size_t>(num_layers) : 0, 1);
  for (size_t n = 0; n < dense.size(); ++n) {
    if (dense[n] >= 0 && dense[n] < static_cast<int64_t>(pattern.size())) {
      pattern[static_cast<size_t>(dense[n])] = 0;
    } else if (layers_valid || dense[n] < 0) {
      problems.push_back(fmt::format("mlp_only_layers[{}] is {}: layers are numbered from 0 to num_hidden_layers - 1 ({})", n,
                                     dense[n], num_layers - 1));
    }
  }
  if (!layers_valid || step < 1) return {};
  for (int64_t i = 0; i < num_layers; ++i) {
    if ((i + 1) % step != 0) pattern[static_cast<size_t>(i)] = 0;
  }
  return pattern;
}

// The hub's name of a model setting (ModelConfig's member name), for model_config_problems'
// messages; moeforge's own keys in config.json are the members' names.
std::string hub_key(std::string_view field, ModelType type, bool rope_parameters) {
  const bool mixtral = type == ModelType::mixtral;
  if (field == "num_layers") return "num_hidden_layers";
  if (field == "num_query_groups") return "num_key_value_heads";
  if (field == "kv_channels") return "head_dim";
  if (field == "ffn_hidden_size") return "intermediate_size";
  if (field == "norm_epsilon") return "rms_norm_eps";
  if (field == "init_method_std") return "initializer_range";
  if (field == "rotary_base") return rope_parameters ? "rope_parameters.rope_theta" : "rope_theta";
  if (field == "moe_router_topk") return "num_experts_per_tok";
  if (field == "moe_aux_loss_coeff") return "router_aux_loss_coef";
  if (field == "num_experts") return mixtral ? "num_local_experts" : "num_experts";
  if (field == "moe_ffn_hidden_size") return mixtral ? "intermediate_size" : "moe_intermediate_size";
  if (field == "moe_shared_expert_intermediate_size") return mixtral ? kSharedSizeKey : "shared_expert_intermediate_size";
  return std::string(field);
}

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
  if (!j.is_object()) fail_user("{}: config.json must be a JSON object of settings, got {}", path, describe(j));
  const Reader r(j, path);
  ModelConfig c;
  const auto type = r.text("model_type", "");
  if (type == "qwen2_moe") c.model_type = ModelType::qwen2_moe;
  else if (type == "mixtral") c.model_type = ModelType::mixtral;
  else if (type == "qwen2") c.model_type = ModelType::qwen2;
  else if (type == "llama") c.model_type = ModelType::llama;
  else if (type.empty()) fail_user("{}: \"model_type\" is missing; moeforge reads qwen2_moe, mixtral, qwen2 and llama", path);
  else fail_user("{}: model_type {} is not supported; moeforge reads qwen2_moe, mixtral, qwen2 and llama", path, describe(json(type)));
  if (const auto act = r.text("hidden_act", "silu"); act != "silu") {
    fail_user("{}: \"hidden_act\" is {}: moeforge's MLP is SwiGLU, which takes \"silu\"", path, describe(json(act)));
  }
  c.num_layers = r.integer("num_hidden_layers");
  c.hidden_size = r.integer("hidden_size");
  c.num_attention_heads = r.integer("num_attention_heads");
  c.num_query_groups = r.integer("num_key_value_heads", c.num_attention_heads);
  // The head size: given, or hidden / heads where that is whole (model_config_problems asks for
  // head_dim otherwise).
  if (r.has("head_dim")) {
    c.kv_channels = r.integer("head_dim");
  } else if (c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0) {
    c.kv_channels = c.hidden_size / c.num_attention_heads;
  }
  c.vocab_size = r.integer("vocab_size");
  c.make_vocab_size_divisible_by = 1;  // the checkpoint's embedding is already as large as it is
  c.max_position_embeddings = r.integer("max_position_embeddings");
  c.rotary_base = rope_theta(r);
  c.norm_epsilon = r.number("rms_norm_eps");
  c.untie_embeddings_and_output_weights = !r.boolean("tie_word_embeddings", false);
  c.init_method_std = r.number("initializer_range", 0.02);
  c.ffn_hidden_size = r.integer("intermediate_size");
  std::vector<std::string> problems;  // of the hub's keys that the model section has no field for
  switch (c.model_type) {
    case ModelType::qwen2_moe: {
      c.add_qkv_bias = r.boolean("qkv_bias", true);
      c.num_experts = r.integer("num_experts");
      c.moe_ffn_hidden_size = r.integer("moe_intermediate_size");
      c.moe_router_topk = r.integer("num_experts_per_tok");
      c.moe_router_pre_softmax = true;
      c.moe_router_norm_topk_prob = r.boolean("norm_topk_prob", false);
      const auto shared = r.integer("shared_expert_intermediate_size", 0);
      if (shared < 0) {
        problems.push_back(fmt::format("shared_expert_intermediate_size must be >= 0 (0: no shared expert), got {}", shared));
      } else if (shared > 0) {
        c.moe_shared_expert_intermediate_size = shared;
        c.moe_shared_expert_gate = true;
      }
      c.moe_layer_freq.pattern = qwen2_moe_layers(r, c.num_layers, problems);
      break;
    }
    case ModelType::mixtral:
      c.num_experts = r.integer("num_local_experts");
      c.moe_ffn_hidden_size = c.ffn_hidden_size;
      c.moe_router_topk = r.integer("num_experts_per_tok");
      c.moe_router_pre_softmax = true;
      c.moe_router_norm_topk_prob = true;
      break;
    case ModelType::qwen2: c.add_qkv_bias = true; break;
    case ModelType::llama:
      c.add_qkv_bias = r.boolean("attention_bias", false);
      if (r.boolean("mlp_bias", false)) fail_user("{}: \"mlp_bias\" is true: moeforge's MLP has no biases", path);
      break;
  }
  if (c.is_moe()) {
    c.moe_router_load_balancing_type = LoadBalancingType::hf_pooled_aux_loss;
    c.moe_aux_loss_coeff = r.number("router_aux_loss_coef", 0.0);
    c.moe_router_enable_expert_bias = r.boolean(kExpertBiasKey, false);
    // A checkpoint moeforge wrote says how it routed; the hub's keys above are what a reader
    // without these computes.
    c.moe_router_pre_softmax = r.boolean(kPreSoftmaxKey, c.moe_router_pre_softmax);
    c.moe_router_norm_topk_prob = r.boolean(kNormTopkKey, c.moe_router_norm_topk_prob);
    if (r.has(kCapacityKey)) c.moe_expert_capacity_factor = r.number(kCapacityKey);
    if (c.model_type == ModelType::mixtral) {
      if (const auto shared = r.integer(kSharedSizeKey, 0); shared < 0) {
        problems.push_back(fmt::format("{} must be >= 0 (0: no shared expert), got {}", kSharedSizeKey, shared));
      } else if (shared > 0) {
        c.moe_shared_expert_intermediate_size = shared;
      }
    }
    if (c.moe_shared_expert_intermediate_size) {
      c.moe_shared_expert_gate = r.boolean(kSharedGateKey, c.model_type == ModelType::qwen2_moe);
    }
  }
  // The YAML config's model rules, under the hub's names (Mixtral's intermediate_size is both FFN
  // widths: one line for it).
  const bool rope_parameters = r.has("rope_parameters");
  const auto name = [&](std::string_view field) { return hub_key(field, c.model_type, rope_parameters); };
  for (auto& p : model_config_problems(c, name)) {
    if (std::find(problems.begin(), problems.end(), p) == problems.end()) problems.push_back(std::move(p));
  }
  if (!problems.empty()) {
    fail_user("{}: invalid Hugging Face config ({} problem{}):\n  - {}", path, problems.size(), problems.size() > 1 ? "s" : "",
              fmt::join(problems, "\n  - "));
  }
  return c;
}

ModelConfig model_config_from_hf_text(std::string_view text, const std::string& path) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // a syntax error, or a number beyond a double (out_of_range)
    fail_user("{}: invalid JSON: {}", path, e.what());
  }
  return model_config_from_hf(j, path);
}

ModelConfig read_hf_config(const std::string& dir) {
  const fs::path config_path = fs::path(dir) / "config.json";
  std::ifstream in(config_path, std::ios::binary);
  if (!in) fail_user("{}: not found; a Hugging Face checkpoint directory holds config.json and *.safetensors", config_path.string());
  return model_config_from_hf_text(std::string(std::istreambuf_iterator<char>(in), {}), config_path.string());
}

json hf_config_from_model(const ModelConfig& c, const std::string& dtype) {
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
            {"dtype", dtype},
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

}  // namespace moeforge::moe
