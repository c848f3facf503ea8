// Load balancing beyond the per-micro-batch loss (issue 20). Aux-loss-free balancing: the router's
// expert bias selects but does not weigh, moves by rate * sign(mean load - load) once per optimizer
// step from the global batch's loads, balances a router that cannot learn, is saved in fp32 and
// restored, and is the same on every rank and layout. global_aux_loss's closed form here; its
// layouts against one process in test_train_distributed.cpp.
#include "core/files/file_names.h"
#include "core/files/safetensors.h"
#include "core/model/transformer.h"
#include "moe/router.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <numeric>

using namespace moeforge;
using namespace moeforge::test;
namespace fs = std::filesystem;

namespace {

ModelConfig router_config(bool pre_softmax, bool norm_topk) {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_experts = 8;
  c.moe_router_topk = 3;
  c.moe_router_pre_softmax = pre_softmax;
  c.moe_router_norm_topk_prob = norm_topk;
  c.moe_router_enable_expert_bias = true;
  return c;
}

// The layers' biases of a saved checkpoint, one vector per MoE layer.
std::vector<std::vector<float>> saved_biases(const fs::path& save, int64_t iteration, int64_t layers) {
  const SafetensorsFile f((save / files::iteration_dir(iteration) / files::kSafetensors).string());
  std::vector<std::vector<float>> out;
  for (int64_t l = 0; l < layers; ++l) {
    const auto t = f.tensor_exactly(fmt::format("model.layers.{}.mlp.gate.expert_bias", l), torch::kFloat32).contiguous();
    out.emplace_back(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  }
  return out;
}

}  // namespace

TEST_CASE("router: the expert bias chooses the experts, the unbiased scores weigh them", "[moe][balance]") {
  for (const bool pre_softmax : {true, false}) {
    for (const bool norm_topk : {false, true}) {
      if (norm_topk && !pre_softmax) continue;
      INFO("pre_softmax " << pre_softmax << " norm_topk " << norm_topk);
      const auto c = router_config(pre_softmax, norm_topk);
      moe::Router router(c);
      model::materialize(*router, torch::TensorOptions().dtype(torch::kFloat32));
      torch::manual_seed(7);
      torch::NoGradGuard no_grad;
      router->weight.normal_(0, 0.5);
      router->expert_bias.uniform_(-0.1, 0.1);
      const auto x_TD = torch::randn({40, 16});
      const auto r = router(x_TD);
      // The reference, element by element in double: scores, then the k best of scores + bias.
      const auto logits = torch::matmul(x_TD, router->weight.t()).to(torch::kFloat64);
      const auto scores = pre_softmax ? torch::softmax(logits, -1) : logits;
      const auto bias = router->expert_bias.to(torch::kFloat64);
      for (int64_t t = 0; t < 40; ++t) {
        std::vector<int64_t> order(8);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return scores[t][a].item<double>() + bias[a].item<double>() > scores[t][b].item<double>() + bias[b].item<double>();
        });
        double kept = 0;
        for (int64_t k = 0; k < 3; ++k) kept += pre_softmax ? scores[t][order[k]].item<double>() : std::exp(scores[t][order[k]].item<double>());
        for (int64_t k = 0; k < 3; ++k) {
          CHECK(r.experts_TK[t][k].item<int64_t>() == order[k]);
          const double s = scores[t][order[k]].item<double>();
          const double expected = pre_softmax ? (norm_topk ? s / kept : s) : std::exp(s) / kept;
          CHECK(r.weights_TK[t][k].item<double>() == Approx(expected).epsilon(1e-5));
        }
      }
      // A bias far above the scores' spread picks its experts for every token, weights unchanged.
      router->expert_bias.zero_();
      router->expert_bias.index_fill_(0, torch::tensor({1, 4, 6}, torch::kInt64), 50.0);
      const auto forced = router(x_TD);
      CHECK(torch::equal(std::get<0>(forced.experts_TK.sort(1)), torch::tensor({1, 4, 6}, torch::kInt64).expand({40, 3})));
      const auto unbiased = scores.gather(1, forced.experts_TK);
      const auto expect = pre_softmax ? (norm_topk ? unbiased / unbiased.sum(-1, true) : unbiased) : torch::softmax(unbiased, -1);
      CHECK(torch::allclose(forced.weights_TK.to(torch::kFloat64), expect, 1e-5, 1e-6));
    }
  }
  // The weight follows the model's precision; the bias stays fp32.
  moe::Router router(router_config(true, false));
  model::materialize(*router, torch::TensorOptions().dtype(torch::kBFloat16));
  CHECK(router->expert_bias.scalar_type() == torch::kFloat32);
  router->to(torch::kFloat32);
  router->to(torch::kBFloat16);
  CHECK(router->weight.scalar_type() == torch::kBFloat16);
  CHECK(router->expert_bias.scalar_type() == torch::kFloat32);
  CHECK_FALSE(router->expert_bias.requires_grad());
}

TEST_CASE("update_expert_bias: rate * sign(mean load - load)", "[moe][balance]") {
  auto bias_E = torch::zeros({4});
  const float r = 1e-3f;
  moe::update_expert_bias(bias_E, torch::tensor({5, 1, 3, 3}, torch::kInt64), 1e-3);  // mean 3
  CHECK(bias_E[0].item<float>() == -r);
  CHECK(bias_E[1].item<float>() == r);
  CHECK(bias_E[2].item<float>() == 0.0f);
  CHECK(bias_E[3].item<float>() == 0.0f);
  moe::update_expert_bias(bias_E, torch::tensor({2.0, 2.0, 9.0, 3.0}, torch::kFloat64), 1e-3);  // mean 4
  CHECK(bias_E[0].item<float>() == -r + r);
  CHECK(bias_E[1].item<float>() == r + r);
  CHECK(bias_E[2].item<float>() == -r);
  CHECK(bias_E[3].item<float>() == r);
}

TEST_CASE("global_aux_loss: E / (K T T_global) sum_e P_e load_e, the micro-batch's aux_loss with its own loads",
          "[moe][balance]") {
  // Two tokens, two experts, top-1: P = [1.5, 0.5], loads [1, 1] -> 2 * (1.5 + 0.5) / (1 * 2 * 2) = 1.
  const auto probs_TE = torch::tensor({{0.5f, 0.5f}, {1.0f, 0.0f}});
  CHECK(moe::global_aux_loss(probs_TE, torch::tensor({1, 1}), 2.0, 1).item<double>() == Approx(1.0));
  // The global batch has 4x the tokens (4 DP ranks) and loads [6, 2]: 2 * (1.5 * 6 + 0.5 * 2) / (1 * 2 * 8).
  CHECK(moe::global_aux_loss(probs_TE, torch::tensor({6, 2}), 8.0, 1).item<double>() == Approx(20.0 / 16.0));
  // With its own loads over its own tokens it is aux_loss.
  torch::manual_seed(3);
  const auto p_TE = torch::softmax(torch::randn({24, 8}), -1);
  const auto experts_TK = std::get<1>(torch::topk(p_TE, 2, -1));
  const auto load_E = moe::slots_per_expert(experts_TK, 8);
  CHECK(moe::global_aux_loss(p_TE, load_E, 24.0, 2).item<double>() ==
        Approx(moe::aux_loss(p_TE, experts_TK, 8).item<double>()).epsilon(1e-6));
}

TEST_CASE("train: the expert bias balances a router that cannot learn, once per step, saved in fp32 and resumed",
          "[train][balance]") {
  TempDir dir;
  const auto config = write_config(dir);
  // Only the final norm trains and there is no aux loss: the routers and what they see are fixed, so
  // only the bias can balance the load. Global batches of 32 x 32 tokens keep the per-step noise of
  // the load (busiest / mean about 1.1 for a balanced router) below the router's imbalance (1.3).
  // A rate of 2e-3 on softmax probabilities of about 1/8 (5e-3 oscillates: docs/model.md).
  const std::string fixed = " --set 'training.trainable=[\"norm.weight\"]' --set model.moe_aux_loss_coeff=0 "
                            "--set training.eval_iters=0 --set training.train_iters=40 --set training.lr_warmup_iters=1 "
                            "--set training.global_batch_size=32";
  auto load = [&](const std::string& name, const std::string& args) {
    const auto run = dir.path() / name;
    train(config, fixed + args + " --set logging.run_dir=" + run.string());
    std::vector<double> ratio;
    for (const auto& m : read_metrics(run / "metrics.jsonl")) ratio.push_back(m[metric::kExpertLoadMaxOverMean].get<double>());
    return ratio;
  };
  const auto plain = load("plain", "");
  const auto biased = load("bias", " --set model.moe_router_enable_expert_bias=true --set model.moe_router_bias_update_rate=2e-3");
  auto excess_of_last_10 = [](const std::vector<double>& r) {
    double sum = 0;
    for (size_t i = r.size() - 10; i < r.size(); ++i) sum += r[i] - 1.0;
    return sum / 10;
  };
  INFO("excess load (busiest / mean - 1) over the last 10 steps: plain " << excess_of_last_10(plain) << ", bias "
                                                                          << excess_of_last_10(biased));
  REQUIRE(plain.size() == 40);
  CHECK(biased[0] == plain[0]);  // the first step routes with a zero bias
  CHECK(excess_of_last_10(plain) > 0.2);
  CHECK(excess_of_last_10(biased) < 0.7 * excess_of_last_10(plain));

  // One update per optimizer step whatever the micro-batch count (global 8 / micro 2 = 4 here),
  // saved as F32 beside bf16 weights, and a resumed run ends with the uninterrupted run's biases.
  const std::string bias = " --set model.moe_router_enable_expert_bias=true --set training.bf16=true "
                           "--set training.eval_iters=0 --set training.lr_warmup_iters=1";
  const auto whole = dir.path() / "whole";
  train(config, bias + " --set training.train_iters=4 --set checkpoint.save_interval=1 --set checkpoint.save=" + whole.string() +
                    " --set logging.run_dir=" + (dir.path() / "whole_run").string());
  for (const auto& layer : saved_biases(whole, 1, 2)) {
    for (const float b : layer) CHECK((b == 0.0f || b == 1e-3f || b == -1e-3f));
  }
  const SafetensorsFile model((whole / files::iteration_dir(1) / files::kSafetensors).string());
  CHECK(model.info("model.layers.0.mlp.gate.expert_bias").dtype == "F32");
  CHECK(model.info("model.layers.0.mlp.gate.weight").dtype == "BF16");
  const auto cut = dir.path() / "cut";
  train(config, bias + " --set training.train_iters=2 --set checkpoint.save=" + cut.string() +
                    " --set logging.run_dir=" + (dir.path() / "cut_run").string());
  train(config, bias + " --set training.train_iters=4 --set checkpoint.save=" + cut.string() +
                    " --set logging.run_dir=" + (dir.path() / "cut_run").string());
  CHECK(saved_biases(cut, 4, 2) == saved_biases(whole, 4, 2));
  const auto moved = saved_biases(whole, 4, 2);
  CHECK(std::any_of(moved[0].begin(), moved[0].end(), [](float b) { return b != 0.0f; }));

  // `forward` builds the model with the bias from config.json and loads it.
  const auto tokens = dir.file("tokens.json", "[1, 2, 3, 4, 5]");
  const auto fwd = run_command(kBin + " forward --checkpoint " + (whole / files::iteration_dir(4)).string() + " --tokens " +
                               tokens + " --out " + (dir.path() / "logits.safetensors").string());
  INFO(fwd.output);
  CHECK(fwd.exit_code == 0);

  // A checkpoint with the bias does not load into a model without it.
  const auto r = run_command(kBin + " train " + config + " --set training.train_iters=5 --set checkpoint.save=" + cut.string());
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Catch::Matchers::Contains("moe_router_enable_expert_bias: checkpoint true, config false"));
}

TEST_CASE("train: the expert biases are the same on every layout and under recomputation", "[train][balance][mpi]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string common = kPipelineModel + " --set model.moe_router_enable_expert_bias=true --set "
                             "model.moe_router_bias_update_rate=1e-2 --set training.train_iters=3 "
                             "--set training.eval_iters=0 --set training.lr_warmup_iters=1";
  std::vector<nlohmann::json> reference_metrics;
  auto biases = [&](const std::string& name, const std::string& launcher, const std::string& args) {
    const auto save = dir.path() / name;
    const auto r = run_command(launcher + kBin + " train " + config + common + args + " --set checkpoint.save=" + save.string() +
                               " --set logging.run_dir=" + (dir.path() / (name + "_run")).string());
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    // Only the saving ranks' biases are in the checkpoint; every other rank's show in the losses:
    // a rank routing with other biases than the single process would change them.
    const auto m = read_metrics(dir.path() / (name + "_run") / "metrics.jsonl");
    if (name == "single") {
      reference_metrics = m;
    } else {
      for (size_t i = 0; i < m.size(); ++i) {
        for (const char* key : {"lm_loss", "aux_loss", "grad_norm"}) {
          INFO(name << " iteration " << i + 1 << " " << key);
          CHECK(relative(m[i][key].get<double>(), reference_metrics[i][key].get<double>()) < 1e-5);
        }
        CHECK(m[i]["expert_load_per_layer"] == reference_metrics[i]["expert_load_per_layer"]);
      }
    }
    return saved_biases(save, 3, 4);
  };
  const auto single = biases("single", "", "");
  CHECK(std::any_of(single[3].begin(), single[3].end(), [](float b) { return b != 0.0f; }));
  CHECK(biases("recompute", "", " --set training.recompute_granularity=full") == single);
  const std::string two = kMpirun + " -np 2 ";
  CHECK(biases("dp2", two, "") == single);
  CHECK(biases("ep2", two, " --set parallel.expert_model_parallel_size=2") == single);
  CHECK(biases("pp2", two, " --set parallel.pipeline_model_parallel_size=2") == single);
  // Sharded over PP 2 x EP 2, converted whole: the same biases again.
  const auto sharded = dir.path() / "pp2_ep2";
  const auto r = run_command(kMpirun + " -np 4 " + kBin + " train " + config + common +
                             " --set parallel.pipeline_model_parallel_size=2 --set parallel.expert_model_parallel_size=2 "
                             "--set checkpoint.format=sharded --set checkpoint.save=" + sharded.string() +
                             " --set logging.run_dir=" + (dir.path() / "pp2_ep2_run").string());
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto converted = dir.path() / "converted";
  const auto conv = run_command(kBin + " convert " + sharded.string() + " " + converted.string() + " --format whole");
  INFO(conv.output);
  REQUIRE(conv.exit_code == 0);
  CHECK(saved_biases(converted, 3, 4) == single);
}
