// launch/run_single_node.sh, run_multi_node.sh (hostfile) and slurm.sbatch (outside SLURM, with
// the variables sbatch sets) start a real 2-rank CPU job, after a dry run; a layout the dry run
// rejects launches nothing; run_benchmark.sh runs a case and reports it. Then the allocation the
// scripts read: hostfiles counted as Open MPI counts them, and SLURM's variables for several job
// shapes (CI has no SLURM: the environments sbatch sets are given here), each checked on the
// mpirun / srun command line a fake launcher records. Expected values come from Open MPI's hostfile
// rules and SLURM's documented formats, not from the scripts.
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <sys/types.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <sstream>
#include <thread>
#include <vector>

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
  const std::string hostfile = dir.file("hosts", "# one line per node\nlocalhost slots=2 max_slots=4  # a cap, not slots\n");
  const std::vector<std::pair<std::string, std::string>> launches = {
      {"single", "bash " + source_path("launch/run_single_node.sh") + " -n 2"},
      {"multi", "bash " + source_path("launch/run_multi_node.sh") + " -H " + hostfile},
      {"slurm", "SLURM_NTASKS=2 SLURM_TASKS_PER_NODE=2 SLURM_JOB_NUM_NODES=1 bash " + source_path("launch/slurm.sbatch")},
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

namespace {

// The variables that would change what the scripts do, cleared so the caller's environment (a
// login shell inside an allocation, say) cannot leak into a case.
const std::string kCleanEnv =
    "env -u SLURM_NTASKS -u SLURM_NPROCS -u SLURM_TASKS_PER_NODE -u SLURM_NTASKS_PER_NODE -u SLURM_JOB_NUM_NODES "
    "-u SLURM_NNODES -u SLURM_JOB_NODELIST -u SLURM_JOB_ID -u SLURM_SUBMIT_DIR -u SLURM_JOB_CPUS_PER_NODE -u MOEFORGE_LAUNCHER "
    "-u MOEFORGE_IFACE -u MOEFORGE_BIND -u NCCL_SOCKET_IFNAME -u OMPI_MCA_btl_tcp_if_include -u CUDA_DEVICE_MAX_CONNECTIONS "
    "-u MOEFORGE_STARTUP_TIMEOUT_S -u OMPI_MCA_btl_vader_single_copy_mechanism -u MOEFORGE_SRUN_MPI ";

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// A launcher that records its arguments (one a line) and its environment, and starts nothing.
struct FakeLauncher {
  TempDir dir;
  std::string path = dir.file("launcher", "#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > \"$(dirname \"$0\")/argv\"\nenv > \"$(dirname \"$0\")/env\"\n");
  FakeLauncher() { fs::permissions(path, fs::perms::owner_all); }
  // The script's exit code and output; the launcher's argv and environment when it ran.
  struct Run {
    CommandResult result;
    bool launched = false;
    std::vector<std::string> argv, env;
  };
  Run run(const std::string& env_and_script, const std::string& config = "cfg.yaml") {
    fs::remove(dir.path() / "argv");
    Run r;
    r.result = run_command(kCleanEnv + "MOEFORGE_SKIP_DRY_RUN=1 MOEFORGE_BIN=/bin/true MOEFORGE_MPIRUN=" + path + " MOEFORGE_SRUN=" +
                           path + " " + env_and_script + " " + config + " --set training.train_iters=1");
    r.launched = fs::exists(dir.path() / "argv");
    if (r.launched) {
      r.argv = lines_of(slurp((dir.path() / "argv").string()));
      r.env = lines_of(slurp((dir.path() / "env").string()));
    }
    return r;
  }
};

// Whether `words` appear in `argv` one right after the other.
bool has_run(const std::vector<std::string>& argv, const std::vector<std::string>& words) {
  return std::search(argv.begin(), argv.end(), words.begin(), words.end()) != argv.end();
}

bool has(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

std::string hostfile_slots(const std::string& hostfile) {
  return run_command("bash -c 'source " + source_path("launch/allocation.sh") + " && moeforge_hostfile_slots " + hostfile + "' 2>/dev/null")
      .output;
}

}  // namespace

TEST_CASE("hostfiles are counted as Open MPI counts slots", "[launch]") {
  FakeLauncher fake;
  const std::string multi = "bash " + source_path("launch/run_multi_node.sh") + " -H ";
  struct Case {
    const char* what;
    const char* hostfile;
    const char* slots;  // "host slots" per host, in order: Open MPI's count for this file
    int ranks_per_node, nproc;
  };
  const std::vector<Case> cases = {
      // the file: max_slots caps slots and is no slot count (grep 'slots=' made it 24)
      {"max_slots", "node1 slots=8 max_slots=8\nnode2 slots=8\n", "node1 8\nnode2 8\n", 8, 16},
      {"comments and blanks", "# rack A\n\n  node1 slots=4   # trailing\n// node8 slots=8\nnode2 slots = 4\n/* node9 slots=9\n   node9 */\n",
       "node1 4\nnode2 4\n", 4, 8},
      // a host listed on n lines without slots= has n slots
      {"repeated hosts", "node1\nnode2\nnode1\nnode2\nnode1\nnode2\n", "node1 3\nnode2 3\n", 3, 6},
      // a further line of a host adds one slot to its count
      {"slots then a repeat", "node1 slots=3\nnode2 slots=4\nnode1\n", "node1 4\nnode2 4\n", 4, 8},
      // max_slots alone: the host gets max_slots slots
      {"max_slots alone", "node1 max_slots=2\nnode2 max-slots=2\n", "node1 2\nnode2 2\n", 2, 4},
      // count= and cpu= are slots=; user@ and the domain name the same host
      {"count cpu user domain", "alice@node1.cluster.org count=2\nnode1\nnode2 cpu=3 port=22\n", "node1 3\nnode2 3\n", 3, 6},
      // a line without slots= counts one slot
      {"no slots", "node1\nnode2\n", "node1 1\nnode2 1\n", 1, 2},
      // ^host removes a host
      {"excluded host", "node1 slots=2\nnode2 slots=2\nnode3 slots=2\n^node2\n", "node1 2\nnode3 2\n", 2, 4},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    const auto hostfile = fake.dir.file("hosts", c.hostfile);
    CHECK(hostfile_slots(hostfile) == c.slots);
    const auto r = fake.run(multi + hostfile);
    INFO(r.result.output);
    REQUIRE(r.result.exit_code == 0);
    REQUIRE(r.launched);
    CHECK(has_run(r.argv, {"-np", std::to_string(c.nproc)}));
    CHECK(has_run(r.argv, {"--hostfile", hostfile}));
    const auto map = std::find(r.argv.begin(), r.argv.end(), "--map-by");
    REQUIRE(map + 1 < r.argv.end());
    CHECK_THAT(map[1], Catch::Matchers::StartsWith("ppr:" + std::to_string(c.ranks_per_node) + ":node"));
    CHECK(has_run(r.argv, {"/bin/true", "train", "cfg.yaml", "--set", "training.train_iters=1"}));
  }
  // -g and -n: N ranks on each host, fewer in all
  const auto hosts = fake.dir.file("hosts", "node1 slots=8\nnode2 slots=8\n");
  const auto g = fake.run(multi + hosts + " -g 4");
  REQUIRE(g.launched);
  CHECK(has_run(g.argv, {"-np", "8"}));
  const auto n = fake.run(multi + hosts + " -n 12");
  REQUIRE(n.launched);
  CHECK(has_run(n.argv, {"-np", "12"}));
}

TEST_CASE("a malformed hostfile is refused naming the file and line and the fix", "[launch]") {
  FakeLauncher fake;
  const std::string multi = "bash " + source_path("launch/run_multi_node.sh") + " -H ";
  struct Case {
    const char* what;
    const char* hostfile;
    std::vector<std::string> says;
  };
  const std::vector<Case> cases = {
      {"not a number", "node1 slots=8\nnode2 slots=eight\n", {"line 2", "slots=eight", "node2 slots=8"}},
      {"no value", "node1 slots=\n", {"line 1", "slots=", "no value"}},
      {"slot count twice", "node1 slots=8\nnode2 slots=8\nnode1 slots=8\n", {"line 3", "node1", "line 1"}},
      {"max below slots", "node1 slots=8 max_slots=4\n", {"line 1", "max_slots=4", "8 slots"}},
      {"unknown keyword", "node1 slot=8\n", {"line 1", "\"slot\"", "node1 slots=8"}},
      {"no host", "slots=8\n", {"line 1", "HOST slots=8"}},
      {"no hosts", "# node1 slots=8\n\n", {"lists no hosts"}},
      {"unequal slots", "node1 slots=8\nnode2 slots=4\n", {"node2 4", "-g"}},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    const auto hostfile = fake.dir.file("hosts", c.hostfile);
    const auto r = fake.run(multi + hostfile);
    INFO(r.result.output);
    CHECK(r.result.exit_code == 2);
    CHECK_FALSE(r.launched);
    CHECK_THAT(r.result.output, Contains(hostfile));
    for (const auto& s : c.says) CHECK_THAT(r.result.output, Contains(s));
  }
  // more ranks per node than a host has slots, more ranks than the hosts hold
  const auto hosts = fake.dir.file("hosts", "node1 slots=4\nnode2 slots=4\n");
  for (const auto& args : {std::string(" -g 8"), std::string(" -n 9")}) {
    const auto r = fake.run(multi + hosts + args);
    INFO(args << "\n" << r.result.output);
    CHECK(r.result.exit_code == 2);
    CHECK_FALSE(r.launched);
  }
}

TEST_CASE("slurm.sbatch takes its ranks from the variables sbatch sets", "[launch]") {
  FakeLauncher fake;
  // The variables sbatch sets for each job shape (SLURM's sbatch(1) OUTPUT ENVIRONMENT VARIABLES):
  // SLURM_TASKS_PER_NODE always, "N(xK)" for K nodes of N tasks; SLURM_NTASKS_PER_NODE only with
  // --ntasks-per-node.
  struct Shape {
    const char* what;
    const char* env;
    int nproc, per_node, nodes;
  };
  const std::vector<Shape> shapes = {
      {"--nodes=2 --ntasks-per-node=4",
       "SLURM_JOB_ID=101 SLURM_JOB_NODELIST='gpu[01-02]' SLURM_JOB_NUM_NODES=2 SLURM_NNODES=2 SLURM_NTASKS=8 SLURM_NPROCS=8 "
       "SLURM_NTASKS_PER_NODE=4 SLURM_TASKS_PER_NODE='4(x2)' SLURM_JOB_CPUS_PER_NODE='64(x2)'",
       8, 4, 2},
      // the shape the old script put on one node: no SLURM_NTASKS_PER_NODE
      {"--nodes=2 --ntasks=6", "SLURM_JOB_ID=102 SLURM_JOB_NODELIST='gpu[01-02]' SLURM_JOB_NUM_NODES=2 SLURM_NNODES=2 SLURM_NTASKS=6 SLURM_NPROCS=6 "
                              "SLURM_TASKS_PER_NODE='3(x2)' SLURM_JOB_CPUS_PER_NODE='64(x2)'",
       6, 3, 2},
      {"--nodes=8 --ntasks-per-node=8", "SLURM_JOB_ID=103 SLURM_JOB_NODELIST='gpu[01-08]' SLURM_JOB_NUM_NODES=8 SLURM_NNODES=8 SLURM_NTASKS=64 "
                                       "SLURM_NPROCS=64 SLURM_NTASKS_PER_NODE=8 SLURM_TASKS_PER_NODE='8(x8)'",
       64, 8, 8},
      {"one node --ntasks=8", "SLURM_JOB_ID=104 SLURM_JOB_NODELIST=gpu01 SLURM_JOB_NUM_NODES=1 SLURM_NNODES=1 SLURM_NTASKS=8 SLURM_NPROCS=8 "
                             "SLURM_TASKS_PER_NODE=8 SLURM_JOB_CPUS_PER_NODE=64",
       8, 8, 1},
  };
  const std::string sbatch = "bash " + source_path("launch/slurm.sbatch");
  for (const auto& s : shapes) {
    INFO(s.what);
    const auto mpirun = fake.run(std::string(s.env) + " " + sbatch);
    INFO(mpirun.result.output);
    REQUIRE(mpirun.result.exit_code == 0);
    REQUIRE(mpirun.launched);
    CHECK(has_run(mpirun.argv, {"-np", std::to_string(s.nproc)}));
    const auto map = std::find(mpirun.argv.begin(), mpirun.argv.end(), "--map-by");
    REQUIRE(map + 1 < mpirun.argv.end());
    CHECK_THAT(map[1], Catch::Matchers::StartsWith("ppr:" + std::to_string(s.per_node) + ":node"));

    const auto srun = fake.run(std::string(s.env) + " MOEFORGE_LAUNCHER=srun MOEFORGE_IFACE=ib0 " + sbatch);
    INFO(srun.result.output);
    REQUIRE(srun.result.exit_code == 0);
    REQUIRE(srun.launched);
    for (const auto& arg : {"--kill-on-bad-exit=1", "--mpi=pmix", "--export=ALL"}) CHECK(has(srun.argv, arg));
    CHECK(has(srun.argv, "--ntasks=" + std::to_string(s.nproc)));
    CHECK(has(srun.argv, "--ntasks-per-node=" + std::to_string(s.per_node)));
    CHECK(has(srun.argv, "--nodes=" + std::to_string(s.nodes)));
    CHECK(has_run(srun.argv, {"/bin/true", "train", "cfg.yaml", "--set", "training.train_iters=1"}));
    // the environment both launchers give every rank (docs/launching.md's table)
    for (const auto& var : {"CUDA_DEVICE_MAX_CONNECTIONS=1", "MOEFORGE_STARTUP_TIMEOUT_S=600", "OMPI_MCA_btl_vader_single_copy_mechanism=none",
                            "NCCL_SOCKET_IFNAME=ib0", "OMPI_MCA_btl_tcp_if_include=ib0"})
      CHECK(has(srun.env, var));
  }
  // MOEFORGE_SRUN_MPI picks srun's MPI plugin
  const auto pmi2 = fake.run(std::string(shapes[0].env) + " MOEFORGE_LAUNCHER=srun MOEFORGE_SRUN_MPI=pmi2 " + sbatch);
  REQUIRE(pmi2.launched);
  CHECK(has(pmi2.argv, "--mpi=pmi2"));
}

TEST_CASE("SLURM_TASKS_PER_NODE expands as SLURM documents it", "[launch]") {
  const auto expand = [](const std::string& env) {
    return run_command(kCleanEnv + env + " bash -c 'source " + source_path("launch/allocation.sh") + " && moeforge_slurm_tasks_per_node'");
  };
  // SLURM's own example: "2(x3),1" is three nodes of two tasks, then one of one
  CHECK(expand("SLURM_TASKS_PER_NODE='2(x3),1' SLURM_NTASKS=7 SLURM_JOB_NUM_NODES=4").output == "2\n2\n2\n1\n");
  CHECK(expand("SLURM_TASKS_PER_NODE='8(x4)' SLURM_NTASKS=32 SLURM_JOB_NUM_NODES=4").output == "8\n8\n8\n8\n");
  CHECK(expand("SLURM_TASKS_PER_NODE='3,2(x2),1'").output == "3\n2\n2\n1\n");
  CHECK(expand("SLURM_TASKS_PER_NODE=5").output == "5\n");
  // inconsistent or malformed: refused, naming the variable
  for (const auto& env : {"SLURM_TASKS_PER_NODE='4(x2)' SLURM_NTASKS=6", "SLURM_TASKS_PER_NODE='4(x2)' SLURM_JOB_NUM_NODES=3",
                          "SLURM_TASKS_PER_NODE='4(2)'", "SLURM_TASKS_PER_NODE='4(x2);1'", "SLURM_TASKS_PER_NODE="}) {
    const auto r = expand(env);
    INFO(env << "\n" << r.output);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.output, Contains("SLURM_TASKS_PER_NODE"));
  }
}

TEST_CASE("slurm.sbatch refuses uneven tasks per node and launches nothing", "[launch]") {
  FakeLauncher fake;
  const std::string sbatch = "bash " + source_path("launch/slurm.sbatch");
  // sbatch --nodes=4 --ntasks=7: SLURM spreads 2 2 2 1
  const auto uneven = fake.run("SLURM_JOB_NUM_NODES=4 SLURM_NTASKS=7 SLURM_TASKS_PER_NODE='2(x3),1' " + sbatch);
  INFO(uneven.result.output);
  CHECK(uneven.result.exit_code == 2);
  CHECK_FALSE(uneven.launched);
  CHECK_THAT(uneven.result.output, Contains("2(x3),1") && Contains("--ntasks-per-node"));
  // without --ntasks or --ntasks-per-node sbatch sets no SLURM_NTASKS: how many ranks is unknown
  const auto unset = fake.run("SLURM_JOB_NUM_NODES=2 SLURM_TASKS_PER_NODE='1(x2)' " + sbatch);
  CHECK(unset.result.exit_code == 2);
  CHECK_FALSE(unset.launched);
  CHECK_THAT(unset.result.output, Contains("SLURM_NTASKS"));
}

TEST_CASE("slurm.sbatch forwards SIGUSR1 to the launcher and exits with its status", "[launch][preemption]") {
  // sbatch --signal=B:USR1@300 signals the batch script alone; mpirun (or srun) must get it, as it
  // forwards it to every rank (docs/training.md, "Stopping early"). The fake launcher exits 0 on
  // SIGUSR1 and 5 if it was never sent one.
  TempDir dir;
  const auto launcher = dir.file("launcher", "#!/usr/bin/env bash\ntrap 'echo forwarded > \"$(dirname \"$0\")/got\"; exit 0' USR1\n"
                                             "for i in $(seq 300); do sleep 0.1; done\nexit 5\n");
  fs::permissions(launcher, fs::perms::owner_all);
  const auto pid_file = dir.path() / "pid", rc_file = dir.path() / "rc";
  run_command("((" + kCleanEnv + "MOEFORGE_SKIP_DRY_RUN=1 MOEFORGE_BIN=/bin/true MOEFORGE_MPIRUN=" + launcher +
              " SLURM_NTASKS=2 SLURM_TASKS_PER_NODE=2 SLURM_JOB_NUM_NODES=1 setsid bash " + source_path("launch/slurm.sbatch") +
              " cfg.yaml > " + (dir.path() / "out").string() + " 2>&1 & echo $! > " + pid_file.string() + "; wait $!; echo $? > " +
              rc_file.string() + ") > /dev/null 2>&1 &)");
  const auto started = std::chrono::steady_clock::now();
  const auto within = [&](int seconds) { return std::chrono::steady_clock::now() - started < std::chrono::seconds(seconds); };
  while (within(20) && !(fs::exists(pid_file) && fs::exists(dir.path() / "out") &&
                         slurp((dir.path() / "out").string()).find("+ ") != std::string::npos)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the script reaches its wait
  ::kill(static_cast<pid_t>(std::stol(slurp(pid_file.string()))), SIGUSR1);
  while (within(40) && !(fs::exists(rc_file) && !slurp(rc_file.string()).empty())) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  INFO(slurp((dir.path() / "out").string()));
  CHECK(fs::exists(dir.path() / "got"));
  CHECK(slurp(rc_file.string()) == "0\n");
}
