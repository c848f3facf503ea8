// Hugging Face checkpoints: models saved by `transformers` load with identical logits, our saved
// checkpoints load in `transformers` with identical logits, and every mismatch is listed.
#include "core/base/errors.h"
#include "core/files/safetensors.h"
#include "launch/train/checkpoint.h"
#include "model_fixture.h"
#include "moe/hf_checkpoint.h"
#include "moe/moe_layer.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <regex>

using namespace moeforge;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

const std::vector<std::vector<int64_t>> kTokens = {{3, 14, 15, 92, 65, 35, 89, 79, 32, 38}, {2, 71, 82, 81, 82, 84, 59, 4, 5, 23}};

torch::Tensor our_logits(model::GPTModelImpl& m) {
  torch::NoGradGuard no_grad;
  std::vector<int64_t> flat;
  for (const auto& r : kTokens) flat.insert(flat.end(), r.begin(), r.end());
  const auto tokens = torch::tensor(flat, torch::kInt64).view({2, 10});
  const auto positions = torch::arange(10, torch::kInt64).unsqueeze(0).expand({2, 10});
  return m.forward(tokens, positions).logits_BSV;
}

torch::Tensor our_logits(moe::HFModel& m) { return our_logits(*m.model); }

torch::Tensor hf_logits(const std::string& dir, const test::TempDir& tmp, const std::string& tag) {
  const auto tokens = tmp.file("tokens.json", json(kTokens).dump());
  const auto out = (tmp.path() / ("logits_" + tag + ".json")).string();
  test::run_oracle("hf_model_oracle.py", "logits " + dir + " " + tokens + " " + out);
  std::ifstream in(out);
  const auto j = json::parse(in);
  return torch::tensor(j["logits"].get<std::vector<float>>()).view({2, 10, -1});
}

double relative_error(const torch::Tensor& a, const torch::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); }

}  // namespace

TEST_CASE("transformers checkpoints load with identical logits, and ours load in transformers", "[checkpoint]") {
  test::TempDir tmp;
  for (const std::string kind : {"qwen2_moe", "qwen2_moe_dense_layer", "mixtral", "qwen2"}) {
    INFO(kind);
    const auto theirs = (tmp.path() / ("hf_" + kind)).string();
    test::run_oracle("hf_model_oracle.py", "save " + kind + " 3 " + theirs);
    auto loaded = moe::load_hf_checkpoint(theirs);
    const auto reference = hf_logits(theirs, tmp, kind);
    const auto ours = our_logits(loaded);
    CHECK(relative_error(ours, reference) < 1e-5);

    const auto saved = (tmp.path() / ("ours_" + kind)).string();
    moe::save_hf_checkpoint(*loaded.model, saved);
    CHECK(relative_error(hf_logits(saved, tmp, kind + "_ours"), ours) < 1e-5);
    auto again = moe::load_hf_checkpoint(saved);  // and the round trip is exact
    CHECK(torch::equal(our_logits(again), ours));
  }
}

TEST_CASE("a checkpoint that does not match its config lists every missing, unexpected and mis-shaped tensor",
          "[checkpoint][errors]") {
  test::TempDir tmp;
  const auto dir = (tmp.path() / "hf").string();
  test::run_oracle("hf_model_oracle.py", "save qwen2_moe 3 " + dir);
  // Rewrite the weights with one expert tensor removed, one renamed and one reshaped.
  NamedTensors tensors;
  {
    const SafetensorsCheckpoint ckpt(dir);
    for (const auto& name : ckpt.names()) {
      auto t = ckpt.tensor(name);
      if (name == "model.layers.0.mlp.experts.1.up_proj.weight") continue;
      if (name == "model.norm.weight") {
        tensors.emplace_back("model.final_norm.weight", t);
        continue;
      }
      if (name == "model.layers.2.mlp.gate.weight") t = t.narrow(0, 0, 5).contiguous();
      tensors.emplace_back(name, t);
    }
  }
  save_safetensors_checkpoint(dir, tensors);
  try {
    moe::load_hf_checkpoint(dir);
    FAIL("expected a UserError");
  } catch (const UserError& e) {
    const std::string msg = e.what();
    CHECK_THAT(msg, Contains("missing (2): ") && Contains("model.layers.0.mlp.experts.1.up_proj.weight") &&
                        Contains("model.norm.weight"));
    CHECK_THAT(msg, Contains("unexpected (1): model.final_norm.weight"));
    CHECK_THAT(msg, Contains("wrong shape (1): model.layers.2.mlp.gate.weight is [5, 32] in the checkpoint, the model needs [8, 32]"));
  }
  CHECK_THROWS_WITH(moe::load_hf_checkpoint((tmp.path() / "nothing").string()), Contains("config.json: not found"));
}

TEST_CASE("moeforge forward prints the loss and writes the logits", "[checkpoint][cli]") {
  test::TempDir tmp;
  const auto dir = (tmp.path() / "hf").string();
  test::run_oracle("hf_model_oracle.py", "save qwen2 5 " + dir);
  const auto tokens = tmp.file("t.json", json(kTokens).dump());
  const auto out = (tmp.path() / "logits.safetensors").string();
  const auto r = test::run_command(test::moeforge_binary() + " forward --checkpoint " + dir + " --tokens " + tokens + " --out " + out);
  REQUIRE(r.exit_code == 0);
  const auto ref_out = (tmp.path() / "ref.json").string();
  test::run_oracle("hf_model_oracle.py", "logits " + dir + " " + tokens + " " + ref_out);
  std::ifstream in(ref_out);
  const auto ref = json::parse(in);
  std::smatch m;
  REQUIRE(std::regex_search(r.output, m, std::regex(R"(lm loss ([0-9.]+))")));
  CHECK(std::stod(m[1]) == Approx(ref["loss"].get<double>()).epsilon(1e-5));
  const SafetensorsFile logits(out);
  CHECK(relative_error(logits.tensor("logits"), torch::tensor(ref["logits"].get<std::vector<float>>()).view({2, 10, -1})) < 1e-5);
  const auto bad = test::run_command(test::moeforge_binary() + " forward --checkpoint " + dir + " --tokens " +
                                     tmp.file("bad.json", "[1, 2, 999999]"));
  CHECK(bad.exit_code == 1);
  CHECK_THAT(bad.output, Contains("token id 999999 is outside the vocabulary"));
}

TEST_CASE("an exported MoE checkpoint runs the trained router in transformers, for every router setting",
          "[checkpoint][router]") {
  // Against transformers' logits of the written checkpoint and moeforge's of the model in memory
  // (not of the file, which the same misreading would make agree).
  test::TempDir tmp;
  for (const auto type : {ModelType::qwen2_moe, ModelType::mixtral}) {
    for (const bool pre_softmax : {false, true}) {
      for (const bool norm : {false, true}) {
        auto c = test::small_moe_config();
        c.model_type = type;
        c.moe_router_topk = 3;
        c.moe_router_pre_softmax = pre_softmax;
        c.moe_router_norm_topk_prob = norm;
        if (type == ModelType::mixtral) {
          c.ffn_hidden_size = c.moe_ffn_hidden_size;  // the hub's Mixtral has one width
          c.moe_shared_expert_intermediate_size.reset();
          c.moe_shared_expert_gate = false;
        }
        const std::string tag = fmt::format("{}_{}_{}", type == ModelType::mixtral ? "mixtral" : "qwen2_moe", pre_softmax, norm);
        INFO(tag);
        auto model = moe::build_model(c);
        model::init_megatron(*model, 11);  // materialised; then overwritten
        {
          torch::NoGradGuard no_grad;  // large random weights: routing far from uniform
          auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
          for (auto& p : model->parameters()) p.copy_(torch::randn(p.sizes(), gen, torch::kFloat32) * 0.3);
        }
        const auto dir = (tmp.path() / tag).string();
        moe::save_hf_checkpoint(*model, dir);
        const auto differences = moe::hf_export_differences(c);
        if (type == ModelType::mixtral && pre_softmax && !norm) {
          // transformers' Mixtral always renormalises: the export says so instead.
          REQUIRE(differences.size() == 1);
          CHECK_THAT(differences[0], Contains("always renormalises"));
        } else {
          CHECK(differences.empty());
          CHECK(relative_error(hf_logits(dir, tmp, tag), our_logits(*model)) < 1e-5);
        }
        // Read back, the checkpoint is the trained model: a resume or a convert accepts it, and
        // moeforge's forward of the file is the model's.
        const auto back = moe::read_hf_config(dir);
        CHECK(back.moe_router_pre_softmax == pre_softmax);
        CHECK(back.moe_router_norm_topk_prob == norm);
        CHECK(model_config_differences(back, c).empty());
        auto loaded = moe::load_hf_checkpoint(dir);
        CHECK(torch::equal(our_logits(loaded), our_logits(*model)));
      }
    }
  }
}

TEST_CASE("the export names what a Hugging Face reader cannot compute, and keeps it for moeforge", "[checkpoint][router]") {
  test::TempDir tmp;
  auto c = test::small_moe_config();
  c.moe_router_enable_expert_bias = true;
  c.moe_expert_capacity_factor = 1.25;
  c.moe_shared_expert_gate = false;
  c.rotary_base = 1e6;
  const auto differences = moe::hf_export_differences(c);
  REQUIRE(differences.size() == 3);
  CHECK_THAT(differences[0], Contains("no expert bias"));
  CHECK_THAT(differences[1], Contains("drops no tokens"));
  CHECK_THAT(differences[2], Contains("always gates its shared expert"));
  auto model = moe::build_model(c);
  model::init_megatron(*model, 3);
  const auto dir = (tmp.path() / "ours").string();
  moe::save_hf_checkpoint(*model, dir);
  std::ifstream in(dir + "/config.json");
  const auto j = json::parse(in);
  CHECK(j["rope_theta"].get<double>() == 1e6);  // older readers look at the top level
  CHECK(j["rope_parameters"]["rope_theta"].get<double>() == 1e6);
  const auto back = moe::read_hf_config(dir);
  CHECK(back.moe_router_enable_expert_bias);
  CHECK(back.moe_expert_capacity_factor == 1.25);
  CHECK_FALSE(back.moe_shared_expert_gate);
  CHECK(model_config_differences(back, c).empty());
}

TEST_CASE("a whole checkpoint carries the config's tokenizer", "[checkpoint]") {
  test::TempDir tmp;
  const auto tok_dir = tmp.path() / "tok";
  std::filesystem::create_directories(tok_dir);
  const auto tokenizer = tmp.file("tok/my-tokenizer.json", "{\"model\": {}}");
  tmp.file("tok/tokenizer_config.json", "{}");
  moe::copy_tokenizer(tokenizer, (tmp.path()).string());
  CHECK(test::slurp((tmp.path() / "tokenizer.json").string()) == "{\"model\": {}}");
  CHECK(std::filesystem::exists(tmp.path() / "tokenizer_config.json"));
  CHECK_FALSE(std::filesystem::exists(tmp.path() / "special_tokens_map.json"));
  moe::copy_tokenizer("byte", (tmp.path() / "none").string());  // the byte-level tokenizer has no file
  CHECK_FALSE(std::filesystem::exists(tmp.path() / "none"));
}
