// The model against Hugging Face `transformers` (tests/oracles/hf_model_oracle.py): tiny random
// Qwen2-MoE (with and without a dense layer), Mixtral and dense Qwen2 models in fp32. Logits, LM
// loss, load-balancing loss and the gradient of every parameter must match.
#include "core/model/gpt_model.h"
#include "moe/model_loss.h"
#include "moe/moe_layer.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fstream>

using namespace moeforge;
using nlohmann::json;

namespace {

const std::vector<std::vector<int64_t>> kTokens = {{1, 5, 9, 200, 3, 77, 12, 8, 100, 101, 5, 6, 7, 250, 0, 42},
                                                   {4, 4, 4, 250, 3, 2, 1, 0, 9, 9, 9, 11, 128, 64, 32, 16}};

ModelConfig tiny_config(const std::string& kind) {
  ModelConfig m;
  m.num_layers = 3;
  m.hidden_size = 32;
  m.num_attention_heads = 4;
  m.num_query_groups = 2;
  m.kv_channels = 8;
  m.vocab_size = 256;
  m.max_position_embeddings = 64;
  m.rotary_base = 10000.0;
  m.norm_epsilon = 1e-6;
  m.untie_embeddings_and_output_weights = true;
  m.moe_router_load_balancing_type = LoadBalancingType::hf_pooled_aux_loss;
  if (kind.rfind("qwen2_moe", 0) == 0) {
    m.ffn_hidden_size = 64;
    m.add_qkv_bias = true;
    m.num_experts = 8;
    m.moe_ffn_hidden_size = 16;
    m.moe_router_topk = 3;
    m.moe_router_pre_softmax = true;
    m.moe_aux_loss_coeff = 0.01;
    m.moe_shared_expert_intermediate_size = 48;
    m.moe_shared_expert_gate = true;
    if (kind == "qwen2_moe_dense_layer") m.moe_layer_freq.pattern = {1, 0, 1};
  } else if (kind == "mixtral") {
    m.ffn_hidden_size = 24;
    m.num_experts = 6;
    m.moe_ffn_hidden_size = 24;
    m.moe_router_topk = 2;
    m.moe_router_pre_softmax = true;
    m.moe_router_norm_topk_prob = true;
    m.moe_aux_loss_coeff = 0.02;
  } else {  // dense qwen2, tied embeddings
    m.ffn_hidden_size = 64;
    m.add_qkv_bias = true;
    m.untie_embeddings_and_output_weights = false;
  }
  return m;
}

torch::Tensor tensor_of(const json& values, const std::vector<int64_t>& shape) {
  const auto v = values.get<std::vector<float>>();
  return torch::tensor(v, torch::kFloat32).reshape(shape);
}

double relative_error(const torch::Tensor& ours, const torch::Tensor& theirs) {
  return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)).item<double>();
}

}  // namespace

TEST_CASE("logits, losses and every gradient match transformers", "[model]") {
  test::TempDir dir;
  const auto tokens_file = dir.file("tokens.json", json(kTokens).dump());
  for (const std::string kind : {"qwen2_moe", "qwen2_moe_dense_layer", "mixtral", "qwen2"}) {
    INFO(kind);
    const auto out_file = (dir.path() / (kind + ".json")).string();
    test::run_oracle("hf_model_oracle.py", "run " + kind + " 0 " + tokens_file + " " + out_file);
    std::ifstream in(out_file);
    const json ref = json::parse(in);

    const ModelConfig config = tiny_config(kind);
    auto model = moe::build_model(config);
    model::materialize(*model, torch::kFloat32);
    {
      torch::NoGradGuard no_grad;
      auto params = model->named_parameters();
      size_t loaded = 0;
      for (const auto& [hf_name, p] : ref["params"].items()) {
        const std::string name = hf_name.rfind("model.", 0) == 0 ? hf_name.substr(6) : hf_name;
        if (!params.contains(name)) {
          INFO("parameter " << hf_name);
          CHECK(name == "lm_head.weight");  // a tied head is the embedding itself
          continue;
        }
        params[name].copy_(tensor_of(p["values"], p["shape"].get<std::vector<int64_t>>()));
        ++loaded;
      }
      CHECK(loaded == params.size());
    }
    const int64_t B = 2, S = 16;
    std::vector<int64_t> flat;
    for (const auto& row : kTokens) flat.insert(flat.end(), row.begin(), row.end());
    const auto tokens = torch::tensor(flat, torch::kInt64).reshape({B, S});
    const auto positions = torch::arange(S, torch::kInt64).unsqueeze(0).expand({B, S});
    // HF shifts inside its loss: our labels are the next token, with the last position masked.
    const auto labels = torch::cat({tokens.narrow(1, 1, S - 1), torch::zeros({B, 1}, torch::kInt64)}, 1);
    const auto mask = torch::cat({torch::ones({B, S - 1}), torch::zeros({B, 1})}, 1);

    const auto out = model->forward(tokens, positions);
    const auto loss = moe::model_loss(config, out, labels, mask);
    loss.total.backward();

    const auto ref_logits = tensor_of(ref["logits"], {B, S, config.padded_vocab_size()});
    CHECK(relative_error(out.logits_BSV.detach(), ref_logits) < 1e-5);
    const double hf_loss = ref["loss"].get<double>();
    CHECK(loss.total.item<double>() == Approx(hf_loss).epsilon(1e-5));
    if (!ref["aux_loss"].is_null()) CHECK(loss.aux.item<double>() == Approx(ref["aux_loss"].get<double>()).epsilon(1e-5));
    for (const auto& [hf_name, g] : ref["grads"].items()) {
      const std::string name = hf_name.rfind("model.", 0) == 0 ? hf_name.substr(6) : hf_name;
      const auto p = model->named_parameters()[name];
      INFO("gradient of " << hf_name);
      REQUIRE(p.grad().defined());
      CHECK(relative_error(p.grad(), tensor_of(g, p.sizes().vec())) < 1e-4);
    }
  }
}
