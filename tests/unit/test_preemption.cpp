// Megatron's early exits (launch/train/exit_conditions.h): training.exit_interval,
// training.exit_duration_in_mins, and training.exit_signal_handler with training.exit_signal. Each
// stops every rank after the same iteration with a checkpoint and exit 0, and the run resumed from
// it equals the run that was never stopped (the reference: a run without the exit).
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <sys/types.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

size_t lines_in(const fs::path& path) {
  std::ifstream in(path);
  size_t n = 0;
  for (std::string line; std::getline(in, line);) ++n;
  return n;
}

// Polls `done` every 20 ms for at most `seconds`.
template <typename F>
bool wait_for(F&& done, int seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

void check_same_metrics(const fs::path& run, const fs::path& reference, size_t iterations) {
  const auto a = read_metrics(run / "metrics.jsonl");
  const auto b = read_metrics(reference / "metrics.jsonl");
  REQUIRE(a.size() == iterations);
  REQUIRE(b.size() == iterations);
  for (size_t i = 0; i < iterations; ++i) {
    INFO("iteration " << i + 1);
    CHECK(without_timing(a[i]).dump() == without_timing(b[i]).dump());
  }
}

}  // namespace

TEST_CASE("preemption: exit_interval and exit_duration_in_mins stop with a checkpoint and the run resumes as if unstopped",
          "[train][checkpoint][preemption]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string args = " --set training.train_iters=6 --set training.eval_interval=2";
  const auto run = [&](const std::string& name, const std::string& extra) {
    return train(config, args + extra + " --set checkpoint.save=" + (dir.path() / name / "ckpt").string() +
                             " --set logging.run_dir=" + (dir.path() / name).string());
  };
  run("reference", "");

  const auto stopped = run("interval", " --set training.exit_interval=4");
  CHECK_THAT(stopped, Contains("stopping after iteration 4: iteration 4 is a multiple of training.exit_interval (4)"));
  CHECK(slurp((dir.path() / "interval" / "ckpt" / "latest_checkpointed_iteration.txt").string()) == "4\n");
  CHECK(lines_in(dir.path() / "interval" / "metrics.jsonl") == 4);
  run("interval", "");  // the same command without the exit: resumes from checkpoint.save
  check_same_metrics(dir.path() / "interval", dir.path() / "reference", 6);

  // Counted from the process's start, as Megatron's: 6 ms have passed by the first step's end.
  const auto timed = run("duration", " --set training.exit_duration_in_mins=0.0001");
  CHECK_THAT(timed, Contains("stopping after iteration 1: the run has lasted more than training.exit_duration_in_mins "
                             "(0.0001 minutes)"));
  CHECK(slurp((dir.path() / "duration" / "ckpt" / "latest_checkpointed_iteration.txt").string()) == "1\n");
  run("duration", "");
  check_same_metrics(dir.path() / "duration", dir.path() / "reference", 6);

  const auto bad = run_command(kBin + " train " + config + " --set training.exit_signal=SIGKILL --set training.exit_interval=0");
  CHECK(bad.exit_code == 1);
  CHECK_THAT(bad.output, Contains("training.exit_signal is 'SIGKILL'") && Contains("SIGUSR1"));
  CHECK_THAT(bad.output, Contains("training.exit_interval"));
}

TEST_CASE("preemption: a signal to one rank under mpirun stops every rank after the same iteration with a checkpoint",
          "[train][checkpoint][preemption][mpi]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string layout = " --set parallel.world_size=2 --set parallel.expert_model_parallel_size=2"
                             " --set training.train_iters=400 --set training.eval_interval=1000";
  const auto ckpt = [&](const std::string& name) { return " --set checkpoint.save=" + (dir.path() / name / "ckpt").string(); };
  const auto run_dir = [&](const std::string& name) { return " --set logging.run_dir=" + (dir.path() / name).string(); };
  const auto log = dir.path() / "log", rc = dir.path() / "rc";
  // In the background, detached from run_command's pipe (which it would otherwise hold open).
  run_command("((" + kMpirun + " -np 2 " + kBin + " train " + config + layout +
              " --set training.exit_signal_handler=true --set training.exit_signal=SIGUSR1" + ckpt("signalled") +
              run_dir("signalled") + " > " + log.string() + " 2>&1; echo $? > " + rc.string() + ") > /dev/null 2>&1 &)");
  // Once two iterations are logged, the last rank alone gets the signal (as from a node's agent).
  REQUIRE(wait_for([&] { return lines_in(dir.path() / "signalled" / "metrics.jsonl") >= 2 || fs::exists(rc); }, 200));
  const auto ranks = run_command("pgrep -f '^" + kBin + " train " + config + "'");
  std::istringstream pids(ranks.output);
  std::string pid, last;
  while (pids >> pid) last = pid;
  REQUIRE(!last.empty());
  ::kill(static_cast<pid_t>(std::stol(last)), SIGUSR1);
  REQUIRE(wait_for([&] { return fs::exists(rc) && !slurp(rc.string()).empty(); }, 200));
  const auto output = slurp(log.string());
  INFO(output);
  CHECK(slurp(rc.string()) == "0\n");
  const auto latest = std::stol(slurp((dir.path() / "signalled" / "ckpt" / "latest_checkpointed_iteration.txt").string()));
  CHECK(latest >= 2);
  CHECK(latest < 400);
  // The rank that got it says so; every rank stopped after the same iteration (exit 0 from both,
  // rank 0's metrics and checkpoint at that iteration).
  CHECK_THAT(output, Contains("[warning] SIGUSR1 received: every rank stops after this iteration"));
  CHECK_THAT(output, Contains(fmt::format("stopping after iteration {}: SIGUSR1 received", latest)));
  CHECK(lines_in(dir.path() / "signalled" / "metrics.jsonl") == static_cast<size_t>(latest));

  // Resumed, two more iterations equal those of a run never stopped (both end by exit_interval).
  const auto until = fmt::format(" --set training.exit_interval={}", latest + 2);
  const auto resumed = run_command(kMpirun + " -np 2 " + kBin + " train " + config + layout + until + ckpt("signalled") +
                                   run_dir("signalled"));
  INFO(resumed.output);
  REQUIRE(resumed.exit_code == 0);
  const auto reference = run_command(kMpirun + " -np 2 " + kBin + " train " + config + layout + until + ckpt("reference") +
                                     run_dir("reference"));
  INFO(reference.output);
  REQUIRE(reference.exit_code == 0);
  check_same_metrics(dir.path() / "signalled", dir.path() / "reference", static_cast<size_t>(latest + 2));
}
