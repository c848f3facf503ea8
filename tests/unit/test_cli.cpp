// The `moeforge` executable as a user runs it: exit codes, messages, --json, docs in sync.
#include "launch/commands/commands.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

using namespace moeforge;
using Catch::Matchers::Contains;
using test::run_command;

namespace {
const std::string kBin = test::moeforge_binary();
}

TEST_CASE("plan --json prints the documented keys with the reference numbers", "[cli]") {
  const auto r = run_command(kBin + " plan configs/qwen1.5-moe-a2.7b.yaml --json 2>/dev/null");
  REQUIRE(r.exit_code == 0);
  const auto j = nlohmann::json::parse(r.output);
  CHECK(j["parameters"]["total"] == 14'315'784'192LL);
  CHECK(j["parameters"]["activated"] == 2'689'173'504LL);
  CHECK(j["parameters"]["activated_non_embedding"] == 2'066'843'648LL);
  CHECK(j["parameters"]["flagperf_compute_n"] == 2'374'762'496LL);
  CHECK(j["flops"]["per_token"]["megatron"].get<double>() / 1e9 == Approx(16.664).margin(0.0005));
  CHECK(j["layout"]["world_size"] == 8);
  CHECK(j["layout"]["data_parallel_size"] == 4);
  CHECK(j["batch"]["micro_batches_per_step"] == 128);
  CHECK(j["batch"]["tokens_per_step"] == 4'194'304);
  CHECK(j["memory"]["stages"].size() == 2);
  for (const char* key : {"weight_bytes", "gradient_bytes", "optimizer_bytes", "optimizer_bytes_distributed",
                          "activation_bytes_per_micro_batch", "activation_bytes_per_micro_batch_full_recompute",
                          "micro_batches_in_flight", "peak_bytes"}) {
    CHECK(j["memory"]["stages"][0].contains(key));
  }
}

TEST_CASE("plan prints the resolved config, then the plan", "[cli]") {
  const auto r = run_command(kBin + " plan configs/tiny.yaml --world-size 2 --set training.global_batch_size=32");
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.output, Contains("resolved config") && Contains("--set training.global_batch_size=32") &&
                           Contains("activated non-embedding") && Contains("micro-batches per step"));
}

TEST_CASE("user errors exit 1 with the message and no stack dump", "[cli][errors]") {
  auto r = run_command(kBin + " plan configs/qwen1.5-moe-a2.7b.yaml --world-size 6");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("error: impossible parallel layout") && Contains("world=6"));
  CHECK_THAT(r.output, !Contains("terminate called") && !Contains("Aborted"));

  r = run_command(kBin + " plan configs/qwen1.5-moe-a2.7b.yaml --set model.num_expert=4");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("did you mean `model.num_experts`?") || Contains("Did you mean `model.num_experts`?"));

  r = run_command(kBin + " plan configs/does-not-exist.yaml");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("config file not found: configs/does-not-exist.yaml"));

  r = run_command(kBin + " plan configs/tiny.yaml --set data.split=0,0,0");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("sums to 0"));

  r = run_command(kBin + " plan");  // usage error from the argument parser
  CHECK(r.exit_code != 0);
  CHECK_THAT(r.output, Contains("config is required"));
}

TEST_CASE("config --yaml round-trips through the loader", "[cli]") {
  test::TempDir dir;
  const auto first = run_command(kBin + " config configs/qwen1.5-moe-a2.7b.yaml --yaml 2>/dev/null");
  REQUIRE(first.exit_code == 0);
  const auto path = dir.file("resolved.yaml", first.output);
  const auto second = run_command(kBin + " config " + path + " --yaml 2>/dev/null");
  REQUIRE(second.exit_code == 0);
  CHECK(second.output == first.output);
}

TEST_CASE("docs/config.md is the generated key reference", "[cli][docs]") {
  std::ifstream file(test::source_path("docs/config.md"));
  std::stringstream text;
  text << file.rdbuf();
  INFO("regenerate with: build/moeforge config --keys > docs/config.md");
  CHECK(text.str() == config_keys_markdown());
}

TEST_CASE("the log level comes from the config unless --log-level is given", "[cli]") {
  auto r = run_command(kBin + " plan configs/tiny.yaml");
  CHECK_THAT(r.output, Contains("[info] planning for world size 4 (from the smallest layout, PP x EP)") ||
                           Contains("planning for world size 1 (from the smallest layout, PP x EP)"));
  r = run_command(kBin + " plan configs/tiny.yaml --set logging.log_level=warn");
  CHECK_THAT(r.output, !Contains("planning for world size"));
  r = run_command(kBin + " --log-level info plan configs/tiny.yaml --set logging.log_level=warn");
  CHECK_THAT(r.output, Contains("planning for world size"));
}

TEST_CASE("plan --save writes the resolved config and the plan into the run directory", "[cli]") {
  test::TempDir dir;
  const auto run_dir = (dir.path() / "run").string();
  const auto r = run_command(kBin + " plan configs/tiny.yaml --save --set logging.run_dir=" + run_dir);
  REQUIRE(r.exit_code == 0);
  std::ifstream plan(run_dir + "/plan.json");
  CHECK(nlohmann::json::parse(plan)["batch"]["global_batch_size"] == 16);
  const auto again = run_command(kBin + " config " + run_dir + "/config.yaml --yaml");
  CHECK(again.exit_code == 0);
}

TEST_CASE("plan and the dry run leave out the resolved-config table with --quiet or a log level above info", "[cli]") {
  const std::string header = "resolved config (configs/tiny.yaml)";
  auto stdout_of = [](const std::string& args) { return run_command(kBin + " " + args + " 2>/dev/null"); };
  auto r = stdout_of("plan configs/tiny.yaml");
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.output, Contains(header) && Contains("micro-batches per step"));
  // Before or after the subcommand.
  for (const char* args : {"plan configs/tiny.yaml --quiet", "--quiet plan configs/tiny.yaml",
                                  "--log-level warn plan configs/tiny.yaml",
                                  "plan configs/tiny.yaml --set logging.log_level=error"}) {
    INFO(args);
    r = stdout_of(std::string(args));
    CHECK(r.exit_code == 0);
    CHECK_THAT(r.output, !Contains(header) && Contains("micro-batches per step"));
  }
  // The dry run reports problems with the data here: the table is what this test is about.
  CHECK_THAT(stdout_of("train configs/tiny.yaml --dry-run").output, Contains(header));
  CHECK_THAT(stdout_of("train configs/tiny.yaml --dry-run --quiet").output,
             !Contains(header) && Contains("dry run for world size"));
  // `config` prints the table because it was asked for it.
  CHECK_THAT(stdout_of("config configs/tiny.yaml --quiet").output, Contains(header));
}
