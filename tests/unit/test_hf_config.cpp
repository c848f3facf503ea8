// A Hugging Face config.json is read as strictly as the YAML config: the published configs read
// with their values, and every invalid value (issue 35: some crashed with SIGFPE, some exited 3,
// some read as another number) is a UserError naming the file and the key, also from the CLI.
#include "core/base/errors.h"
#include "moe/hf_config.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>

using namespace moeforge;
using Catch::Matchers::Contains;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const fs::path kCorpus = fs::path(test::source_dir()) / "tests/fuzz/corpus/hf_config";

// A small Qwen2-MoE config.json, valid as it is.
json small_qwen2_moe() {
  return {{"model_type", "qwen2_moe"}, {"hidden_act", "silu"}, {"hidden_size", 128}, {"num_hidden_layers", 4},
          {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 256}, {"max_position_embeddings", 128},
          {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0}, {"intermediate_size", 256}, {"num_experts", 8},
          {"moe_intermediate_size", 64}, {"num_experts_per_tok", 2}, {"shared_expert_intermediate_size", 128},
          {"decoder_sparse_step", 1}, {"mlp_only_layers", json::array()}, {"router_aux_loss_coef", 0.001}};
}

// DIR/config.json holding `config`; returns DIR.
std::string write_config(const test::TempDir& tmp, const std::string& name, const std::string& text) {
  const fs::path dir = tmp.path() / name;
  fs::create_directories(dir);
  tmp.file(name + "/config.json", text);
  return dir.string();
}

// The UserError reading `config` gives.
std::string error_of(const test::TempDir& tmp, const std::string& name, const json& config) {
  const auto dir = write_config(tmp, name, config.dump());
  return test::user_error([&] { moe::read_hf_config(dir); });
}

}  // namespace

TEST_CASE("published config.json files read with their values", "[checkpoint][hf_config]") {
  const auto qwen = moe::model_config_from_hf_text(test::slurp((kCorpus / "qwen1.5-moe-a2.7b.json").string()), "qwen");
  CHECK(qwen.model_type == ModelType::qwen2_moe);
  CHECK(qwen.num_layers == 24);
  CHECK(qwen.num_moe_layers() == 24);
  CHECK(*qwen.num_experts == 60);
  CHECK(qwen.moe_router_topk == 4);
  CHECK(*qwen.kv_channels == 128);
  CHECK(*qwen.moe_shared_expert_intermediate_size == 5632);
  CHECK(qwen.moe_shared_expert_gate);
  CHECK(qwen.rotary_base == 1e6);
  const auto mixtral = moe::model_config_from_hf_text(test::slurp((kCorpus / "mixtral-8x7b.json").string()), "mixtral");
  CHECK(*mixtral.num_experts == 8);
  CHECK(*mixtral.num_query_groups == 8);
  CHECK(*mixtral.moe_ffn_hidden_size == 14336);
  const auto llama = moe::model_config_from_hf_text(test::slurp((kCorpus / "llama-2-7b.json").string()), "llama");
  CHECK_FALSE(llama.is_moe());
  CHECK(*llama.kv_channels == 128);
  // Qwen2-MoE's sparse step and dense layers: layer i is MoE when (i + 1) % step == 0.
  json c = small_qwen2_moe();
  c["decoder_sparse_step"] = 2;
  c["mlp_only_layers"] = {3};
  CHECK(moe::model_config_from_hf(c, "c").moe_layer_freq.pattern == std::vector<int64_t>{0, 1, 0, 0});
}

TEST_CASE("each invalid config.json value is a user error naming the file and the key", "[checkpoint][hf_config][errors]") {
  test::TempDir tmp;
  struct Case {
    const char* key;
    json value;
    const char* says;
  };
  // The crashes and silent misreadings of issue 35 first, then every other range.
  const std::vector<Case> cases = {
      {"decoder_sparse_step", 0, "decoder_sparse_step must be positive"},  // was SIGFPE
      {"num_attention_heads", 0, "num_attention_heads must be positive, got 0"},  // was SIGFPE
      {"num_experts", -8, "num_experts must be positive, got -8"},  // was exit 3
      {"num_experts_per_tok", 9, "num_experts_per_tok (9) must be between 1 and num_experts (8)"},  // was exit 3
      {"num_experts_per_tok", 0, "num_experts_per_tok (0) must be between 1 and num_experts (8)"},  // was accepted
      {"head_dim", -16, "head_dim must be positive, got -16"},  // was exit 3
      {"hidden_size", 128.7, "\"hidden_size\" must be an integer"},  // was read as 128
      {"rms_norm_eps", -1e-6, "rms_norm_eps must be positive, got -1e-06"},  // trained to NaN
      {"hidden_size", "128", "\"hidden_size\" must be an integer (a JSON number without a fraction or exponent, not quoted), got \"128\" (a string)"},
      {"num_hidden_layers", true, "\"num_hidden_layers\" must be an integer"},
      {"num_experts", json::array({8}), "\"num_experts\" must be an integer"},
      {"rms_norm_eps", "1e-6", "\"rms_norm_eps\" must be a number, got \"1e-6\" (a string)"},
      {"tie_word_embeddings", 0, "\"tie_word_embeddings\" must be true or false, got 0"},
      {"num_hidden_layers", 0, "num_hidden_layers must be positive, got 0"},
      {"num_hidden_layers", int64_t{1} << 40, "num_hidden_layers is 1099511627776, above the largest supported, 65536"},
      {"hidden_size", int64_t{1} << 40, "hidden_size is 1099511627776, above the largest supported"},
      {"num_key_value_heads", 3, "num_attention_heads (4) is not divisible by num_key_value_heads (3)"},
      {"num_key_value_heads", 0, "num_key_value_heads must be positive, got 0"},
      {"vocab_size", 0, "vocab_size must be positive, got 0"},
      {"max_position_embeddings", -1, "max_position_embeddings must be positive, got -1"},
      {"rope_theta", 0.0, "rope_theta must be positive, got 0"},
      {"intermediate_size", 0, "intermediate_size must be positive, got 0"},
      {"moe_intermediate_size", 0, "moe_intermediate_size must be positive, got 0"},
      {"mlp_only_layers", json::array({1, 4}), "mlp_only_layers[1] is 4: layers are numbered from 0"},
      {"mlp_only_layers", json::array({-1}), "mlp_only_layers[0] is -1"},
      {"mlp_only_layers", json::array({1.5}), "\"mlp_only_layers[0]\" must be an integer"},
      {"shared_expert_intermediate_size", -1, "shared_expert_intermediate_size must be >= 0"},
      {"initializer_range", -0.02, "initializer_range must be positive, got -0.02"},
      {"router_aux_loss_coef", -1.0, "router_aux_loss_coef must be >= 0, got -1"},
      {"moe_expert_capacity_factor", 0.0, "moe_expert_capacity_factor must be positive, got 0"},
      {"moe_expert_capacity_factor", 1e30, "moe_expert_capacity_factor is 1e+30, above num_experts (8)"},
      {"rms_norm_eps", 1e-50, "rms_norm_eps is 1e-50, which is 0 in fp32"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    INFO(c.key << " = " << c.value.dump());
    json config = small_qwen2_moe();
    config[c.key] = c.value;
    const auto name = "case" + std::to_string(i);
    const auto msg = error_of(tmp, name, config);
    CHECK_THAT(msg, Contains((tmp.path() / name / "config.json").string()) && Contains(c.key) && Contains(c.says));
  }
}

TEST_CASE("config.json: relations, the hub's other families and the file's shape are checked too",
          "[checkpoint][hf_config][errors]") {
  test::TempDir tmp;
  // Without head_dim the head size is hidden / heads, and must be whole: the fix is named.
  json c = small_qwen2_moe();
  c["hidden_size"] = 130;
  CHECK_THAT(error_of(tmp, "divisible", c),
             Contains("hidden_size (130) is not divisible by num_attention_heads (4)") && Contains("set head_dim explicitly"));
  c["head_dim"] = 32;
  CHECK(moe::model_config_from_hf(c, "c").head_dim() == 32);
  // All problems at once.
  c = small_qwen2_moe();
  c["num_experts"] = 0;
  c["rms_norm_eps"] = 0.0;
  c["decoder_sparse_step"] = -1;
  CHECK_THAT(error_of(tmp, "several", c), Contains("invalid Hugging Face config (4 problems)") &&
                                              Contains("decoder_sparse_step must be positive") &&
                                              Contains("num_experts must be positive") && Contains("rms_norm_eps must be positive"));
  // Mixtral's names for the same settings.
  json mixtral = json::parse(test::slurp((kCorpus / "mixtral-8x7b.json").string()));
  mixtral["num_local_experts"] = -1;
  CHECK_THAT(error_of(tmp, "mixtral", mixtral), Contains("num_local_experts must be positive, got -1"));
  mixtral["num_local_experts"] = 8;
  mixtral["intermediate_size"] = 0;
  CHECK_THAT(error_of(tmp, "mixtral2", mixtral),
             Contains("(1 problem)") && Contains("intermediate_size must be positive, got 0"));
  // Missing keys, unsupported options, a value beyond 64 bits, a file that is no object or no JSON.
  c = small_qwen2_moe();
  c.erase("num_experts_per_tok");
  CHECK_THAT(error_of(tmp, "missing", c), Contains("\"num_experts_per_tok\" is missing"));
  c = small_qwen2_moe();
  c["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 1e6}};
  CHECK_THAT(error_of(tmp, "rope", c), Contains("\"rope_parameters.rope_type\" is \"yarn\""));
  c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", -1.0}};
  CHECK_THAT(error_of(tmp, "rope2", c), Contains("rope_parameters.rope_theta must be positive, got -1"));
  c["rope_parameters"] = 5;
  CHECK_THAT(error_of(tmp, "rope3", c), Contains("\"rope_parameters\" must be an object, got 5"));
  c = small_qwen2_moe();
  c["model_type"] = 2;
  CHECK_THAT(error_of(tmp, "type", c), Contains("\"model_type\" must be a string, got 2"));
  const auto dir = write_config(tmp, "big", R"({"model_type": "qwen2", "num_hidden_layers": 18446744073709551615})");
  CHECK_THAT(test::user_error([&] { moe::read_hf_config(dir); }), Contains("beyond 64-bit integers"));
  const auto list = write_config(tmp, "list", "[1, 2]");
  CHECK_THAT(test::user_error([&] { moe::read_hf_config(list); }), Contains("must be a JSON object of settings, got a list"));
  const auto huge = write_config(tmp, "huge", R"({"rms_norm_eps": 1e400})");
  CHECK_THAT(test::user_error([&] { moe::read_hf_config(huge); }), Contains("config.json: invalid JSON"));
}

TEST_CASE("every regression seed of the config.json fuzzer is a user error", "[checkpoint][hf_config][errors]") {
  int seeds = 0;
  for (const auto& entry : fs::directory_iterator(kCorpus)) {
    if (!entry.path().filename().string().starts_with("regression-")) continue;
    INFO(entry.path().string());
    CHECK_THROWS_AS(moe::model_config_from_hf_text(test::slurp(entry.path().string()), entry.path().string()), UserError);
    ++seeds;
  }
  CHECK(seeds >= 10);
}

TEST_CASE("moeforge forward on a checkpoint with an invalid config.json exits 1 naming the file and the key",
          "[checkpoint][hf_config][errors][cli]") {
  test::TempDir tmp;
  json config = small_qwen2_moe();
  config["decoder_sparse_step"] = 0;  // SIGFPE before (layer % 0)
  const auto dir = write_config(tmp, "hf", config.dump());
  const auto tokens = tmp.file("t.json", "[[1, 2, 3]]");
  const auto r = test::run_command(test::moeforge_binary() + " forward --checkpoint " + dir + " --tokens " + tokens);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains((fs::path(dir) / "config.json").string()) &&
                           Contains("decoder_sparse_step must be positive (every k-th layer is MoE), got 0"));
}
