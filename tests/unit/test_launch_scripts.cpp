// launch/run_single_node.sh, run_multi_node.sh (hostfile) and slurm.sbatch (outside SLURM, with
// the variables sbatch sets) start a real 2-rank CPU job, after a dry run; a layout the dry run
// rejects launches nothing; run_benchmark.sh runs a case and reports it.
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>

#include <filesystem>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

TEST_CASE("the launch scripts run a 2-rank job after a dry run", "[launch][mpi]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string env = "env MOEFORGE_BIN=" + kBin + " MOEFORGE_MPIRUN=" + mpiexec() + " ";
  const auto args = [&](const std::string& name) {
    return " " + config + " --set training.train_iters=2 --set training.lr_warmup_iters=0 --set training.eval_iters=0 --set logging.run_dir=" +
           (dir.path() / name).string();
  };
  const std::string hostfile = dir.file("hosts", "# one line per node\nlocalhost slots=2\n");
  const std::vector<std::pair<std::string, std::string>> launches = {
      {"single", "bash " + source_path("launch/run_single_node.sh") + " -n 2"},
      {"multi", "bash " + source_path("launch/run_multi_node.sh") + " -H " + hostfile},
      {"slurm", "SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE='2(x1)' bash " + source_path("launch/slurm.sbatch")},
  };
  for (const auto& [name, launch] : launches) {
    INFO(name);
    const auto r = run_command(env + launch + args(name));
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    CHECK_THAT(r.output, Contains("dry run for world size 2 passed") && Contains("world 2 = PP 1 x DP 2"));
    const auto m = read_metrics(dir.path() / name / "metrics.jsonl");
    REQUIRE(m.size() == 2);
    CHECK(m[1]["rank_times"]["compute_s"].size() == 2);
  }
  const auto bad = run_command(env + "bash " + source_path("launch/run_single_node.sh") + " -n 3" + args("bad") +
                               " --set parallel.pipeline_model_parallel_size=2");
  INFO(bad.output);
  CHECK(bad.exit_code == 1);
  CHECK_THAT(bad.output, Contains("nothing was launched"));
  CHECK_FALSE(fs::exists(dir.path() / "bad"));
  // run_benchmark.sh: a case, then its report (against the single-node run above as reference).
  const auto bench = run_command(env + "bash " + source_path("launch/run_benchmark.sh") + " -n 2 -r " +
                                 (dir.path() / "single").string() + " -o " + (dir.path() / "bench").string() + " " + config +
                                 " --set training.train_iters=2 --set training.lr_warmup_iters=0 --set training.eval_iters=0");
  INFO(bench.output);
  REQUIRE(bench.exit_code == 0);
  CHECK_THAT(bench.output, Contains("TP1xPP1xDP2xEP1") && Contains("report.html"));
  for (const char* f : {"report.json", "report.md", "report.html"}) CHECK(fs::exists(dir.path() / "bench" / "report" / f));
  const auto no_hostfile = run_command(env + "bash " + source_path("launch/run_multi_node.sh") + args("x"));
  CHECK(no_hostfile.exit_code == 2);
  CHECK_THAT(no_hostfile.output, Contains("-H HOSTFILE"));
}
