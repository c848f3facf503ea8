// `moeforge train` end to end, against independent references: Megatron-Core's LR scheduler, a
// PyTorch + transformers training loop (tests/oracles/train_oracle.py), and runs of itself only
// where the property is self-consistency (determinism, resume, kill during save).
#include "core/config/config_loader.h"
#include "core/optim/lr_schedule.h"
#include "core/optim/optimizer.h"
#include "core/files/safetensors.h"
#include "launch/train/checkpoint.h"
#include "launch/train/metrics.h"
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
using nlohmann::json;
namespace fs = std::filesystem;


TEST_CASE("LR schedule equals Megatron-Core's OptimizerParamScheduler", "[train][lr][oracle]") {
  struct Case {
    LrDecayStyle style;
    const char* name;
    int64_t warmup, decay, iters;
  };
  const std::vector<Case> cases{{LrDecayStyle::cosine, "cosine", 5, 40, 50},
                                {LrDecayStyle::linear, "linear", 3, 20, 25},
                                {LrDecayStyle::constant, "constant", 4, 20, 10},
                                {LrDecayStyle::cosine, "cosine", 0, 30, 35}};
  const double lr = 3e-4, min_lr = 3e-5;
  const int64_t gbs = 512;
  std::string args = "lr";
  for (const auto& c : cases) args += fmt::format(" {},{},{},{},{},{},{}", c.name, c.warmup, c.decay, lr, min_lr, gbs, c.iters);
  const auto output = run_oracle("train_oracle.py", args);
  // The JSON is the last line (Megatron-Core may warn on import).
  const auto trimmed = output.substr(0, output.find_last_not_of('\n') + 1);
  const auto expected = json::parse(trimmed.substr(trimmed.find_last_of('\n') + 1));
  REQUIRE(expected.size() == cases.size());
  for (size_t k = 0; k < cases.size(); ++k) {
    const auto& c = cases[k];
    TrainingConfig t;
    t.lr = lr;
    t.min_lr = min_lr;
    t.lr_decay_style = c.style;
    t.lr_warmup_iters = c.warmup;
    t.lr_decay_iters = c.decay;
    t.global_batch_size = gbs;
    LrSchedule s(t);
    for (int64_t i = 0; i < c.iters; ++i) {
      INFO(c.name << " warm-up " << c.warmup << ", iteration " << i + 1);
      CHECK(s.current() == Approx(expected[k][static_cast<size_t>(i)].get<double>()).epsilon(1e-12).margin(1e-18));
      s.step();
    }
  }
}

TEST_CASE("parameter-name globs select what trains", "[train][freeze]") {
  CHECK(glob_match("layers.*.mlp.gate.weight", "layers.11.mlp.gate.weight"));
  CHECK_FALSE(glob_match("layers.*.mlp.gate.weight", "layers.1.mlp.gate_proj.weight"));
  CHECK(glob_match("*bias", "layers.0.self_attn.q_proj.bias"));
  CHECK(glob_match("layers.?.mlp.*", "layers.3.mlp.experts.down_proj"));
  CHECK_FALSE(glob_match("layers.?.mlp.*", "layers.13.mlp.experts.down_proj"));
  const std::vector<std::pair<std::string, torch::Tensor>> named{{"a.weight", torch::zeros({2, 2})},
                                                                  {"a.bias", torch::zeros({2})},
                                                                  {"norm.weight", torch::zeros({2})}};
  TrainingConfig t;
  auto all = select_trainable(named, t);
  REQUIRE(all.size() == 3);
  CHECK(all[0].weight_decay);
  CHECK_FALSE(all[1].weight_decay);  // bias
  CHECK_FALSE(all[2].weight_decay);  // 1-D (norm)
  t.frozen = {"a.*"};
  const auto some = select_trainable(named, t);
  REQUIRE(some.size() == 1);
  CHECK(some[0].name == "norm.weight");
  CHECK_FALSE(named[0].second.requires_grad());
  t.frozen = {"typo.*"};
  CHECK_THAT(user_error([&] { select_trainable(named, t); }), Contains("'typo.*' matches no parameter"));
  t.frozen = {"*"};
  CHECK_THAT(user_error([&] { select_trainable(named, t); }), Contains("no parameter to train"));
}

TEST_CASE("train matches a PyTorch + transformers training loop over 30 iterations", "[train][oracle][slow]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto init = (dir.path() / "init").string();
  run_oracle("train_oracle.py", "init " + init + " 7");
  const auto out = train(config, "--load " + init);
  CHECK_THAT(out, Contains("MFU") && Contains("resolved config") && Contains("initialized the model from"));
  const auto ours = read_metrics(dir.path() / "run" / "metrics.jsonl");
  REQUIRE(ours.size() == 30);

  const auto samples = run_command(kBin + " data samples " + config + " --first 240 --json 2>/dev/null");
  REQUIRE(samples.exit_code == 0);
  std::ofstream(dir.path() / "samples.json") << samples.output;
  const auto loaded = load_config(config);
  const auto& t = loaded.config.training;
  std::ofstream(dir.path() / "hparams.json") << json{{"global_batch_size", t.global_batch_size},
                                                      {"micro_batch_size", t.micro_batch_size},
                                                      {"train_iters", t.train_iters},
                                                      {"lr", t.lr},
                                                      {"min_lr", t.min_lr},
                                                      {"lr_decay_style", "cosine"},
                                                      {"lr_warmup_iters", t.lr_warmup_iters},
                                                      {"lr_decay_iters", *t.lr_decay_iters},
                                                      {"weight_decay", t.weight_decay},
                                                      {"adam_beta1", t.adam_beta1},
                                                      {"adam_beta2", t.adam_beta2},
                                                      {"adam_eps", t.adam_eps},
                                                      {"clip_grad", t.clip_grad}}
                                                         .dump();
  const auto ref_path = dir.path() / "reference.json";
  run_oracle("train_oracle.py", fmt::format("train {} {} {} {}", init, (dir.path() / "samples.json").string(),
                                            (dir.path() / "hparams.json").string(), ref_path.string()));
  const auto ref = json::parse(slurp(ref_path.string()));
  REQUIRE(ref.size() == 30);
  double rel_sum = 0, worst = 0;
  for (size_t i = 0; i < 30; ++i) {
    const double a = ours[i]["lm_loss"].get<double>(), b = ref[i]["lm_loss"].get<double>();
    rel_sum += std::abs(a - b) / b;
    worst = std::max(worst, std::abs(a - b) / b);
    CHECK(ours[i]["lr"].get<double>() == Approx(ref[i]["lr"].get<double>()).epsilon(1e-12));
    CHECK(ours[i]["aux_loss"].get<double>() == Approx(ref[i]["aux_loss"].get<double>()).epsilon(1e-3));
    CHECK(ours[i]["grad_norm"].get<double>() == Approx(ref[i]["grad_norm"].get<double>()).epsilon(1e-2));
  }
  const double mean_rel = rel_sum / 30;
  INFO("mean relative lm-loss difference " << mean_rel << ", worst " << worst);
  CHECK(mean_rel < 1e-3);
  // And it learned: the loss fell well below its start.
  CHECK(ours.back()["lm_loss"].get<double>() < 0.6 * ours.front()["lm_loss"].get<double>());
  std::cout << fmt::format("[train vs transformers] 30 iterations: mean relative lm-loss difference {:.3g}, worst {:.3g}; "
                           "loss {:.4f} -> {:.4f}\n",
                           mean_rel, worst, ours.front()["lm_loss"].get<double>(), ours.back()["lm_loss"].get<double>());
}

TEST_CASE("the quickstart corpus and config train a healthy MoE: the loss clearly going down, no spike, even load",
          "[train][quickstart]") {
  TempDir dir;
  const auto prefix = (dir.path() / "corpus").string();
  const auto corpus = run_command("bash " + source_path("launch/corpus.sh") + " " + prefix);
  INFO(corpus.output);
  REQUIRE(corpus.exit_code == 0);
  const auto out = train(source_path("configs/quickstart.yaml"),
                         "--set 'data.data_path=[" + prefix + "_text_document]' --set checkpoint.save=" +
                             (dir.path() / "ckpt").string() + " --set logging.run_dir=" + (dir.path() / "run").string() +
                             " --set hardware.num_threads=1");
  const auto m = read_metrics(dir.path() / "run" / "metrics.jsonl");
  REQUIRE(m.size() == 40);
  CHECK_THAT(out, Contains("iteration 40/40") && Contains("MFU") && Contains("calibrated"));
  double first = 0, last = 0;
  for (size_t i = 0; i < 5; ++i) first += m[i]["lm_loss"].get<double>() / 5;
  for (size_t i = 35; i < 40; ++i) last += m[i]["lm_loss"].get<double>() / 5;
  CHECK(last < 0.6 * first);
  CHECK(m[39]["valid_lm_loss"].get<double>() < m[19]["valid_lm_loss"].get<double>());
  // What a first-time user should see of an MoE: after the first iterations no loss more than 25 %
  // above the one before it, and the busiest expert within 3x the mean load at the end (E/k = 15
  // would be total collapse).
  for (size_t i = 5; i < m.size(); ++i) {
    INFO("iteration " << i + 1);
    CHECK(m[i]["lm_loss"].get<double>() < 1.25 * m[i - 1]["lm_loss"].get<double>());
  }
  CHECK(m[39]["expert_load_max_over_mean"].get<double>() < 3.0);
  CHECK_THAT(out, !Contains("routing collapse"));  // its start-up imbalance is over within the grace iterations
  CHECK(fs::exists(dir.path() / "ckpt" / "iter_0000040" / "model.safetensors"));
}

TEST_CASE("host_syncs counts the step's device waits: the dispatcher's counts per MoE layer and micro-batch, "
          "the losses, the gradient norm, the step's end",
          "[train][host_syncs]") {
  // The fixture: 2 MoE layers, 4 micro-batches of 2 samples per step. Full recomputation runs each
  // layer's forward again in the backward, so its dispatcher reads its counts twice.
  TempDir dir;
  const auto config = write_config(dir);
  for (const auto& [recompute, per_layer] : {std::pair{"none", 1}, std::pair{"full", 2}}) {
    INFO("recompute " << recompute);
    const auto run = dir.path() / recompute;
    train(config, fmt::format("--set training.train_iters=2 --set training.lr_warmup_iters=1 --set "
                              "training.eval_iters=0 --set training.recompute_granularity={} --set logging.run_dir={}",
                              recompute, run.string()));
    const auto m = read_metrics(run / "metrics.jsonl");
    REQUIRE(m.size() == 2);
    for (const auto& step : m) CHECK(step["host_syncs"].get<int>() == 4 * 2 * per_layer + 3);
  }
}

TEST_CASE("logging.profile records the chosen iterations: a Chrome trace and the top operators", "[train][profile]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string profiled = "--set training.train_iters=3 --set training.eval_iters=0 --set logging.profile=true "
                               "--set logging.profile_step_start=2 --set logging.profile_step_end=3";
  const auto output = train(config, profiled);  // stdout and stderr
  // Kineto's own lines stay off the screen of a CPU run: a CUDA build's failing GPU query on a
  // machine without a GPU driver (`gpuGetDeviceCount failed with code 35`), profiler_start/stop.
  CHECK_THAT(output, !Contains("gpuGetDeviceCount") && !Contains("profiler_start") && !Contains("ERROR:"));
  // A level the user sets is Kineto's to use.
  const auto verbose = run_command("KINETO_LOG_LEVEL=0 " + kBin + " train " + config + " " + profiled +
                                   " --set logging.run_dir=" + (dir.path() / "verbose").string());
  CHECK(verbose.exit_code == 0);
  CHECK_THAT(verbose.output, Contains("profiler_start"));
  const auto profile = dir.path() / "run" / "profile";
  REQUIRE(fs::exists(profile / "trace.json"));
  const auto table = slurp((profile / "top_ops.txt").string());
  CHECK_THAT(table, Contains("profile of iterations 2..2") && Contains("CPU operators") && Contains("aten::mm"));
  // The trace is JSON that Chrome's and Perfetto's viewers read: a traceEvents list.
  const auto trace = nlohmann::json::parse(slurp((profile / "trace.json").string()));
  CHECK(trace["traceEvents"].size() > 100);
  const auto bad = run_command(kBin + " train " + config + " --set logging.profile=true --set logging.profile_step_start=5 "
                                                           "--set logging.profile_step_end=5");
  CHECK(bad.exit_code == 1);
  CHECK_THAT(bad.output, Contains("logging.profile_step_end (5) must be above logging.profile_step_start (5)"));
}

TEST_CASE("train --quiet starts without the resolved-config table", "[train][cli]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string one_step =
      " --set training.train_iters=1 --set training.lr_warmup_iters=0 --set training.eval_iters=0 --set logging.run_dir=";
  CHECK_THAT(train(config, one_step + (dir.path() / "loud").string()), Contains("resolved config ("));
  const auto quiet = train(config, "--quiet" + one_step + (dir.path() / "quiet").string());
  CHECK_THAT(quiet, !Contains("resolved config (") && Contains("iteration 1/1"));
}
