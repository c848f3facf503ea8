// Both routings in one report (docs/report.md): run_benchmark.sh -R both under mpirun EP2, its
// straggler cost recomputed by a numpy oracle from the per-rank times in metrics.jsonl, and
// expert_loads.jsonl against closed forms (every layer's counts sum to tokens x top-k; forced
// routing is round robin).
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

TEST_CASE("run_benchmark.sh -R both under mpirun EP2: the straggler cost equals the oracle's from rank_times",
          "[report][routing][mpi]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string env = "env MOEFORGE_BIN=" + kBin + " MOEFORGE_MPIRUN=" + mpiexec() + " ";
  const auto bench = dir.path() / "bench";
  const auto r = run_command(env + "bash " + source_path("launch/run_benchmark.sh") + " -n 2 --routing both -o " +
                             bench.string() + " " + config +
                             " --set parallel.expert_model_parallel_size=2 --set training.train_iters=6 "
                             "--set training.eval_iters=0 --set training.lr_warmup_iters=1 --set logging.expert_loads_interval=2");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.output, Contains("TP1xPP1xDP2xEP2") && Contains("comparison.html"));
  for (const char* f : {"comparison.json", "comparison.md", "comparison.html"}) CHECK(fs::exists(bench / "report" / f));
  for (const char* run : {"natural", "forced"}) CHECK(fs::exists(bench / "report" / run / "report.html"));

  // Which run is which: in the title and in comparison.json.
  const auto c = read_json(bench / "report" / "comparison.json");
  CHECK_THAT(c["title"].get<std::string>(), Contains("natural routing (natural)") && Contains("forced routing (forced)"));
  REQUIRE(c["routing"].size() == 2);
  CHECK(c["routing"][0]["routing"] == "natural");
  CHECK(c["routing"][1]["routing"] == "forced");
  CHECK(c["runs"][1]["routing"] == "forced");
  CHECK(c["loss_curves"].size() == 2);
  CHECK(c["loss_curves"][0]["lm_loss"].size() == 6);

  // Every rank recorded its compute before the all-to-alls; the forced run really was forced.
  const auto natural = read_metrics(bench / "natural" / "metrics.jsonl");
  const auto forced = read_metrics(bench / "forced" / "metrics.jsonl");
  REQUIRE(natural.size() == 6);
  REQUIRE(forced.size() == 6);
  for (const auto& m : natural) {
    REQUIRE(m["rank_times"]["compute_before_all_to_all_s"].size() == 2);
    for (const auto& v : m["rank_times"]["compute_before_all_to_all_s"]) CHECK(v.get<double>() > 0);
    CHECK_FALSE(m.contains("moe_router_force_load_balancing"));
  }
  for (const auto& m : forced) CHECK(m["moe_router_force_load_balancing"] == true);

  // The straggler cost and its split, recomputed from the per-rank times alone.
  const auto oracle_out = (dir.path() / "oracle.json").string();
  run_oracle("straggler_oracle.py",
             (bench / "natural" / "metrics.jsonl").string() + " " + (bench / "forced" / "metrics.jsonl").string() + " " + oracle_out);
  const auto expected = read_json(oracle_out);
  const auto& s = c["straggler_cost"];
  REQUIRE(s.is_object());
  for (const char* key : {"natural_step_time_s", "forced_step_time_s", "straggler_cost_s", "ep_wait_s", "rest_s"}) {
    INFO(key);
    CHECK(s[key].get<double>() == Approx(expected[key].get<double>()).epsilon(1e-12).margin(1e-15));
  }
  CHECK(expected["steps"] == 5);
  CHECK(s["ep_wait_s"].get<double>() >= 0);
  CHECK_THAT(s["formula"].get<std::string>(), Contains("max_r c_r - mean_r c_r"));
  const std::string md = slurp(bench / "report" / "comparison.md");
  CHECK_THAT(md, Contains("natural routing (natural) against forced routing (forced)") && Contains("straggler cost (natural - forced)") &&
                     Contains("MFU (megatron)") && Contains("MFU (six_n)"));
  // The routing is the comparison's subject: the forced row says so in its config cell, and the
  // routing key is no "not like for like" difference.
  CHECK_THAT(md, Contains("| TP1xPP1xDP2xEP2 |") && Contains(" (forced routing) | "));
  CHECK(c["runs"][1]["config_differences"].empty());
  CHECK(md.find("Not like for like") == std::string::npos);
  const std::string html = slurp(bench / "report" / "comparison.html");
  CHECK_THAT(html, Contains("The straggler's cost") && Contains("LM loss of each run") && Contains("memory used/total"));
  // The natural run's report draws a histogram of tokens per expert for each MoE layer.
  const std::string run_html = slurp(bench / "report" / "natural" / "report.html");
  CHECK_THAT(run_html, Contains("<title>MoE layer 0</title>") && Contains("<title>MoE layer 1</title>"));
}

TEST_CASE("expert_loads.jsonl: each layer sums to tokens x top-k and forced routing is round robin", "[report][routing]") {
  TempDir dir;
  // 6 experts: a micro-batch's 2 x 32 tokens x top-4 = 256 slots are not a multiple of 6, so round
  // robin leaves a remainder: experts 0-3 get one slot more per micro-batch.
  const auto config = write_config(dir);
  const std::string common = " --set model.num_experts=6 --set training.train_iters=3 --set training.eval_iters=0 "
                             "--set training.lr_warmup_iters=1 --set logging.expert_loads_interval=2";
  const int64_t global_batch = 8, seq = 32, topk = 4, micro_batch = 2, experts = 6;
  const int64_t slots_per_micro_batch = micro_batch * seq * topk;
  const int64_t micro_batches = global_batch / micro_batch;
  for (const bool force : {false, true}) {
    INFO("forced " << force);
    const auto run = dir.path() / (force ? "forced" : "natural");
    const auto r = run_command(kBin + " train " + config + common + " --set logging.run_dir=" + run.string() +
                               " --set model.moe_router_force_load_balancing=" + (force ? "true" : "false"));
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    const auto lines = read_metrics(run / "expert_loads.jsonl");
    REQUIRE(lines.size() == 2);  // iteration 2 (the interval) and 3 (the last)
    CHECK(lines[0]["iteration"] == 2);
    CHECK(lines[1]["iteration"] == 3);
    for (const auto& line : lines) {
      const auto counts = line["tokens_per_expert"].get<std::vector<std::vector<int64_t>>>();
      REQUIRE(counts.size() == 2);  // both layers are MoE layers
      for (const auto& layer : counts) {
        REQUIRE(std::ssize(layer) == experts);
        int64_t sum = 0;
        for (int64_t v : layer) sum += v;
        CHECK(sum == global_batch * seq * topk);
        if (!force) continue;
        for (int64_t e = 0; e < experts; ++e) {
          // slot (t, k) -> (t K + k) mod E within each micro-batch (moe/router.h).
          const int64_t per_micro_batch = slots_per_micro_batch / experts + (e < slots_per_micro_batch % experts ? 1 : 0);
          CHECK(layer[static_cast<size_t>(e)] == micro_batches * per_micro_batch);
        }
      }
    }
  }
  // 0 = off: no file.
  const auto off = dir.path() / "off";
  const auto r = run_command(kBin + " train " + config + common + " --set logging.expert_loads_interval=0 --set logging.run_dir=" +
                             off.string());
  REQUIRE(r.exit_code == 0);
  CHECK_FALSE(fs::exists(off / "expert_loads.jsonl"));
}
