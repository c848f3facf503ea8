// `mpirun -np N moeforge train`: data-parallel runs equal the single-process run of the same global
// batch (losses, gradient norms, validation loss and every parameter after 3 iterations, fp32,
// relative 1e-5), and a killed rank ends the job.
#include "core/safetensors.h"
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <thread>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {
const std::string kMpirun = std::string("env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                                        "OMPI_MCA_btl_vader_single_copy_mechanism=none timeout 300 ") +
                            MOEFORGE_MPIEXEC + " --oversubscribe";

double relative(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-30); }
}  // namespace

TEST_CASE("data-parallel training equals the single-process run", "[train][distributed][mpi]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string args = " --set training.train_iters=3 --set training.eval_interval=2 --set training.eval_iters=1";
  auto run = [&](int ranks, const std::string& name) {
    const std::string cmd = (ranks == 1 ? kBin : kMpirun + " -np " + std::to_string(ranks) + " " + kBin) + " train " +
                            config + args + " --set checkpoint.save=" + (dir.path() / name / "ckpt").string() +
                            " --set logging.run_dir=" + (dir.path() / name).string();
    const auto r = run_command(cmd);
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return r.output;
  };
  run(1, "single");
  const auto single = read_metrics(dir.path() / "single" / "metrics.jsonl");
  const SafetensorsCheckpoint reference((dir.path() / "single" / "ckpt" / "iter_0000003").string());
  for (int ranks : {2, 4}) {
    INFO("DP " << ranks);
    const auto name = "dp" + std::to_string(ranks);
    const auto out = run(ranks, name);
    CHECK_THAT(out, Contains(fmt::format("world {} = PP 1 x DP {}", ranks, ranks)));
    const auto m = read_metrics(dir.path() / name / "metrics.jsonl");  // written once, by rank 0
    REQUIRE(m.size() == 3);
    for (size_t i = 0; i < 3; ++i) {
      INFO("iteration " << i + 1);
      for (const char* key : {"lm_loss", "aux_loss", "grad_norm"}) {
        INFO(key);
        CHECK(relative(m[i][key].get<double>(), single[i][key].get<double>()) < 1e-5);
      }
      CHECK(m[i]["consumed_samples"] == single[i]["consumed_samples"]);
      CHECK(m[i]["lr"] == single[i]["lr"]);
    }
    CHECK(relative(m[1]["valid_lm_loss"].get<double>(), single[1]["valid_lm_loss"].get<double>()) < 1e-5);
    const SafetensorsCheckpoint trained((dir.path() / name / "ckpt" / "iter_0000003").string());
    REQUIRE(trained.names() == reference.names());
    double worst = 0, worst_k_bias = 0;
    for (const auto& tensor : reference.names()) {
      const auto a = trained.tensor(tensor, torch::kFloat64), b = reference.tensor(tensor, torch::kFloat64);
      if (tensor.find("k_proj.bias") != std::string::npos) {
        // The key bias has an exactly zero gradient (softmax ignores a shift shared by all keys): it
        // moves only by Adam normalizing rounding noise, so only an absolute bound (lr-sized) applies.
        worst_k_bias = std::max(worst_k_bias, (a - b).abs().max().item<double>());
        continue;
      }
      worst = std::max(worst, (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30));
    }
    INFO("largest relative parameter difference " << worst << ", key bias " << worst_k_bias);
    CHECK(worst < 1e-5);
    CHECK(worst_k_bias < 2e-3 * 3);
  }
}

TEST_CASE("a rank killed during data-parallel training ends the job", "[train][distributed][mpi][slow]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto run_dir = dir.path() / "run";
  const auto pid_file = dir.path() / "pid";
  run_command("(" + kMpirun + " -np 2 " + kBin + " train " + config + " --set training.train_iters=100000 " +
              "--set training.lr_warmup_iters=0 --set parallel.distributed_timeout_minutes=0.1 --set logging.run_dir=" +
              run_dir.string() + " > " + (dir.path() / "log").string() + " 2>&1; echo $? > " +
              (dir.path() / "exit").string() + ") > /dev/null 2>&1 & echo $! > " + pid_file.string());
  // Once training runs, kill one rank: the newest process of this run (the ranks start after mpirun).
  // `[.]` keeps the pattern from matching the shell that runs pkill.
  const std::string pattern = "'logging[.]run_dir=" + run_dir.string() + "'";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(run_dir / "metrics.jsonl") || fs::file_size(run_dir / "metrics.jsonl") == 0) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(run_command("pkill -9 -n -f " + pattern).exit_code == 0);
  while (!fs::exists(dir.path() / "exit") && std::chrono::steady_clock::now() < t0 + std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(slurp((dir.path() / "log").string()));
  REQUIRE(fs::exists(dir.path() / "exit"));
  CHECK(std::stoi(slurp((dir.path() / "exit").string())) != 0);
  CHECK(seconds < 30);
  run_command("pkill -9 -f " + pattern);
}
