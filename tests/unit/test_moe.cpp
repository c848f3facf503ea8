// MoE pieces against closed forms: router variants, load-balancing and z losses under uniform
// routing, capacity dropping, the dispatch round trip, Megatron's initialization, bf16.
#include "../unit/model_fixture.h"
#include "core/model/gpt_model.h"
#include "moe/dispatcher.h"
#include "moe/model_loss.h"
#include "moe/moe_layer.h"
#include "moe/router.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <tuple>
#include <vector>

using namespace moeforge;

TEST_CASE("router variants: Qwen, Mixtral and Megatron's default", "[moe]") {
  torch::manual_seed(0);
  auto c = test::small_moe_config();
  const auto x_TD = torch::randn({50, 64});
  moe::Router qwen(c);
  model::materialize(*qwen, torch::kFloat32);  // modules are built on the meta device
  torch::nn::init::normal_(qwen->weight, 0.0, 0.5);
  const auto probs_TE = torch::softmax(torch::matmul(x_TD, qwen->weight.t()), -1);
  const auto [top_TK, idx_TK] = torch::topk(probs_TE, 2, -1);
  const auto q = qwen(x_TD);
  CHECK(torch::equal(q.experts_TK, idx_TK));
  CHECK(torch::allclose(q.weights_TK, top_TK, 1e-6, 1e-7));
  CHECK((q.weights_TK.sum(-1) < 1).all().item<bool>());  // no renormalization

  c.moe_router_norm_topk_prob = true;  // Mixtral
  moe::Router mixtral(c);
  model::materialize(*mixtral, torch::kFloat32);
  mixtral->weight.set_data(qwen->weight.clone());
  const auto m = mixtral(x_TD);
  CHECK(torch::allclose(m.weights_TK, top_TK / top_TK.sum(-1, true), 1e-6, 1e-7));

  c.moe_router_norm_topk_prob = false;
  c.moe_router_pre_softmax = false;  // Megatron: top-k on logits, softmax over the k
  moe::Router megatron(c);
  model::materialize(*megatron, torch::kFloat32);
  megatron->weight.set_data(qwen->weight.clone());
  const auto g = megatron(x_TD);
  CHECK(torch::equal(g.experts_TK, idx_TK));  // softmax is monotone: the same experts
  CHECK(torch::allclose(g.weights_TK, m.weights_TK, 1e-5, 1e-6));  // and mathematically Mixtral's weights
}

TEST_CASE("forced load balance: every expert gets T*K/E slots (+-1), each token K distinct experts", "[moe][balance]") {
  for (const auto& [T, K, E] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {64, 4, 8}, {50, 4, 60}, {7, 2, 3}, {1, 4, 60}, {333, 4, 60}, {128, 1, 16}, {10, 8, 8}}) {
    INFO("T " << T << " K " << K << " E " << E);
    const auto experts_TK = moe::forced_experts(T, K, E, torch::TensorOptions());
    const auto counts = torch::bincount(experts_TK.reshape({-1}), {}, E);
    CHECK(counts.sum().item<int64_t>() == T * K);
    CHECK(counts.max().item<int64_t>() - counts.min().item<int64_t>() <= 1);
    CHECK(counts.max().item<int64_t>() == (T * K + E - 1) / E);
    for (int64_t t = 0; t < T; ++t) CHECK(std::get<0>(torch::_unique(experts_TK[t])).numel() == K);
  }
  // The router still runs: its weights are the variant's weights of the forced experts.
  torch::manual_seed(0);
  auto c = test::small_moe_config();
  c.moe_router_force_load_balancing = true;
  const auto x_TD = torch::randn({50, 64});
  for (const bool pre_softmax : {true, false}) {
    c.moe_router_pre_softmax = pre_softmax;
    moe::Router router(c);
    model::materialize(*router, torch::kFloat32);
    torch::nn::init::normal_(router->weight, 0.0, 0.5);
    const auto r = router(x_TD);
    const auto logits_TE = torch::matmul(x_TD, router->weight.t());
    CHECK(torch::equal(r.experts_TK, moe::forced_experts(50, 2, 8, torch::TensorOptions())));
    const auto expected = pre_softmax ? torch::softmax(logits_TE, -1).gather(1, r.experts_TK)
                                      : torch::softmax(logits_TE.gather(1, r.experts_TK), -1);
    CHECK(torch::allclose(r.weights_TK, expected, 1e-6, 1e-6));
    CHECK(torch::allclose(r.probs_TE, torch::softmax(logits_TE, -1), 1e-6, 1e-7));  // what the aux loss sees
  }
}

TEST_CASE("load-balancing and z losses take their closed-form values under uniform routing", "[moe]") {
  const int64_t T = 64, E = 8, K = 2;
  const auto probs_TE = torch::full({T, E}, 1.0 / E);
  // Perfectly balanced: slot k of token t goes to expert (t * K + k) % E.
  const auto experts_TK = (torch::arange(T * K, torch::kInt64) % E).view({T, K});
  CHECK(moe::aux_loss(probs_TE, experts_TK, E).item<double>() == Approx(1.0));
  CHECK(moe::seq_aux_loss(probs_TE, experts_TK, E, 16).item<double>() == Approx(1.0));
  const std::vector<torch::Tensor> logits = {torch::zeros({T, E}), torch::zeros({T, E})};
  CHECK(moe::hf_pooled_aux_loss(logits, E, K).item<double>() == Approx(static_cast<double>(K)));
  CHECK(moe::z_loss(torch::zeros({T, E})).item<double>() == Approx(std::pow(std::log(8.0), 2)));
  // Total collapse (every probability and slot on expert 0): E / (K T^2) * T * (T K) = E.
  const auto collapsed_TE = torch::zeros({T, E}).index_fill_(1, torch::tensor({0}), 1.0);
  CHECK(moe::aux_loss(collapsed_TE, torch::zeros({T, K}, torch::kInt64), E).item<double>() == Approx(static_cast<double>(E)));
}

TEST_CASE("capacity limits drop the lowest-probability or the latest slots", "[moe]") {
  // 8 tokens, top-1, 4 experts, factor 1: capacity ceil(8 / 4) = 2. Everything goes to expert 0.
  const auto experts_TK = torch::zeros({8, 1}, torch::kInt64);
  const auto weights_TK = torch::tensor({0.1f, 0.9f, 0.3f, 0.8f, 0.2f, 0.7f, 0.4f, 0.6f}).view({8, 1});
  const auto by_position = moe::apply_capacity(experts_TK, weights_TK, 4, 1.0, TokenDropPolicy::position);
  CHECK(torch::equal(by_position.view({-1}), torch::tensor({0, 0, 4, 4, 4, 4, 4, 4}, torch::kInt64)));
  const auto by_probs = moe::apply_capacity(experts_TK, weights_TK, 4, 1.0, TokenDropPolicy::probs);
  CHECK(torch::equal(by_probs.view({-1}), torch::tensor({4, 0, 4, 0, 4, 4, 4, 4}, torch::kInt64)));
  // The dispatcher sends only kept slots and returns zeros for dropped ones.
  moe::LocalDispatcher d(4);
  const auto x_TD = torch::arange(8, torch::kFloat32).view({8, 1});
  const auto sent = d.dispatch(x_TD, by_probs);
  CHECK(sent.dropped == 6);
  CHECK(sent.rows_per_local_expert == std::vector<int64_t>{2, 0, 0, 0});
  const auto back = d.combine(sent.x_ND, sent, torch::ones({8, 1}));
  CHECK(torch::equal(back.view({-1}), torch::tensor({0.f, 1.f, 0.f, 3.f, 0.f, 0.f, 0.f, 0.f})));
}

TEST_CASE("dispatch then combine returns every slot to its token, weighted", "[moe]") {
  torch::manual_seed(1);
  const auto x_TD = torch::randn({37, 5});
  const auto experts_TK = torch::randint(0, 6, {37, 3}, torch::kInt64);
  moe::LocalDispatcher d(6);
  const auto sent = d.dispatch(x_TD, experts_TK);
  int64_t total = 0;
  for (auto n : sent.rows_per_local_expert) total += n;
  CHECK(total == 37 * 3);
  // Rows grouped by expert: each row's expert is its block's.
  const auto experts_N = experts_TK.view({-1}).index_select(0, sent.slot_of_row_N);
  CHECK(torch::equal(experts_N, std::get<0>(torch::sort(experts_TK.view({-1})))));
  // Slot k alone (one-hot weights) brings back its token's row exactly; any weights scale it by their sum.
  for (int64_t k = 0; k < 3; ++k) {
    const auto onehot_TK = torch::zeros({37, 3}).index_fill_(1, torch::tensor({k}), 1.0);
    CHECK(torch::equal(d.combine(sent.x_ND, sent, onehot_TK), x_TD));
  }
  const auto w_TK = torch::rand({37, 3});
  CHECK(torch::allclose(d.combine(sent.x_ND, sent, w_TK), x_TD * w_TK.sum(1, true), 1e-6, 1e-6));
}

TEST_CASE("Megatron initialization and bf16 execution", "[moe]") {
  auto c = test::small_moe_config();
  c.hidden_size = 256;
  c.num_attention_heads = 4;
  c.kv_channels = 64;
  c.init_method_std = 0.02;
  c.add_qkv_bias = true;
  auto model = moe::build_model(c);
  model::init_megatron(*model, 7);
  const auto params = model->named_parameters();
  CHECK(params["layers.0.self_attn.q_proj.weight"].std().item<double>() == Approx(0.02).epsilon(0.05));
  CHECK(params["layers.0.self_attn.o_proj.weight"].std().item<double>() == Approx(0.02 / 2.0).epsilon(0.05));  // sqrt(2 * 2 layers)
  CHECK(params["layers.1.mlp.experts.down_proj"].std().item<double>() == Approx(0.01).epsilon(0.05));
  CHECK(params["layers.0.self_attn.q_proj.bias"].abs().max().item<double>() == 0.0);
  CHECK(params["norm.weight"].eq(1.0).all().item<bool>());

  const auto tokens = torch::randint(0, 256, {2, 16}, torch::kInt64);
  const auto positions = torch::arange(16, torch::kInt64).unsqueeze(0).expand({2, 16});
  const auto fp32 = model->forward(tokens, positions).logits_BSV;
  model->to(torch::kBFloat16);
  const auto bf16 = model->forward(tokens, positions).logits_BSV;
  CHECK(bf16.scalar_type() == torch::kBFloat16);
  CHECK(((bf16.to(torch::kFloat32) - fp32).norm() / fp32.norm()).item<double>() < 3e-2);
}

TEST_CASE("each parameter's initialization is its own stream: a part materialised alone equals the whole's",
          "[moe][init]") {
  const auto c = test::small_moe_config();
  auto whole = moe::build_model(c);
  CHECK(whole->named_parameters()["layers.0.mlp.experts.gate_up_proj"].is_meta());  // built without memory
  model::init_megatron(*whole, 5);
  const auto params = whole->named_parameters();
  // An expert-parallel rank holding experts 2..5 of layer 1, and a rank holding the head only.
  auto experts = torch::empty({4, 2 * 32, 64});
  model::init_megatron_parameter(c, "layers.1.mlp.experts.gate_up_proj", experts, 5, 2);
  CHECK(torch::equal(experts, params["layers.1.mlp.experts.gate_up_proj"].narrow(0, 2, 4)));
  auto head = torch::empty({c.padded_vocab_size(), 64});
  model::init_megatron_parameter(c, "lm_head.weight", head, 5);
  CHECK(torch::equal(head, params["lm_head.weight"]));
  // Streams differ by name and seed.
  auto other = torch::empty({c.padded_vocab_size(), 64});
  model::init_megatron_parameter(c, "lm_head.weight", other, 6);
  CHECK_FALSE(torch::equal(head, other));
  CHECK_FALSE(torch::equal(params["layers.0.self_attn.q_proj.weight"], params["layers.1.self_attn.q_proj.weight"]));
}

TEST_CASE("full and selective recomputation give the same losses and gradients", "[moe][recompute]") {
  for (const auto balancing : {LoadBalancingType::aux_loss, LoadBalancingType::hf_pooled_aux_loss}) {
    auto c = test::small_moe_config();
    c.moe_router_load_balancing_type = balancing;
    c.moe_aux_loss_coeff = 0.1;
    c.moe_z_loss_coeff = 0.01;
    c.moe_layer_freq.pattern = {1, 0};  // an MoE and a dense layer
    torch::manual_seed(3);
    const auto tokens = torch::randint(0, 256, {2, 12}, torch::kInt64);
    const auto positions = torch::arange(12, torch::kInt64).unsqueeze(0).expand({2, 12});
    const auto mask = torch::ones({2, 12});
    std::vector<std::pair<double, std::vector<torch::Tensor>>> runs;
    for (const auto mode : {RecomputeGranularity::none, RecomputeGranularity::full, RecomputeGranularity::selective}) {
      auto model = moe::build_model(c);
      model::init_megatron(*model, 11);
      model->set_recompute(mode);
      const auto out = model->forward(tokens, positions);
      const auto loss = moe::model_loss(c, out, tokens, mask);
      loss.total.backward();
      std::vector<torch::Tensor> grads;
      for (const auto& p : model->parameters()) grads.push_back(p.grad().clone());
      runs.emplace_back(loss.total.item<double>(), grads);
    }
    for (size_t r = 1; r < runs.size(); ++r) {
      INFO("mode " << r << " balancing " << to_string(balancing));
      CHECK(runs[r].first == Approx(runs[0].first).epsilon(1e-6));
      for (size_t i = 0; i < runs[0].second.size(); ++i) {
        CHECK(torch::allclose(runs[r].second[i], runs[0].second[i], 1e-5, 1e-7));
      }
    }
  }
}
