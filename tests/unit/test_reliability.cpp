// Nothing lost, nothing trusted (issue 19): a run's directories are its own while it runs, a full
// disk under metrics.jsonl ends the run with a clear error, a resume repairs a cut line, and a
// save directory without its tracker is not silently overwritten.
#include "core/files/dir_lock.h"
#include "core/files/replace_dir.h"
#include "core/base/errors.h"
#include "core/files/file_names.h"
#include "data/indexed_dataset.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

constexpr const char* kFaultEnv = "MOEFORGE_FAULT_KILL_AFTER_RENAME";

// A background shell command (its output redirected: run_command reads until every writer of its
// pipe is gone); its pid, read from the file it writes.
long start_background(const std::string& command, const fs::path& pid_file) {
  run_command("(" + command + " & echo $! > " + pid_file.string() + ")");
  return std::stol(slurp(pid_file.string()));
}

void wait_gone(long pid) { run_command(fmt::format("while kill -0 {} 2>/dev/null; do sleep 0.05; done", pid)); }

bool wait_for(const fs::path& path, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (!fs::exists(path)) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

std::string record_of(const std::string& host, long pid) {
  return nlohmann::json{{"host", host}, {"pid", pid}, {"job", "j1"}, {"started", "2026-12-01T00:00:00Z"}}.dump() + "\n";
}

}  // namespace

TEST_CASE("a directory lock is exclusive, names its owner and is released", "[reliability][lock]") {
  TempDir dir;
  const fs::path path = dir.path() / files::kDirectoryLock;
  auto lock = DirectoryLock::acquire(dir.path(), "logging.run_dir");
  const auto record = nlohmann::json::parse(slurp(path.string()));
  CHECK(record["pid"] == static_cast<int64_t>(::getpid()));
  CHECK(record["host"] == this_host());
  CHECK(record.contains("job"));
  CHECK(record.contains("started"));
  // A second owner, even in this process (flock is per open file), is refused with the owner named.
  const auto message = user_error([&] { DirectoryLock::acquire(dir.path(), "logging.run_dir"); });
  CHECK_THAT(message, Contains("logging.run_dir") && Contains("in use by another run") &&
                          Contains(fmt::format("pid {}", ::getpid())) && Contains(path.string()));
  CHECK(slurp(path.string()) == lock->record());  // the refused attempt changed nothing
  lock.reset();
  CHECK_FALSE(fs::exists(path));
  CHECK(DirectoryLock::acquire(dir.path(), "logging.run_dir") != nullptr);
}

TEST_CASE("a lock held by a live process is refused, and once it died the lock is taken over", "[reliability][lock]") {
  TempDir dir;
  const fs::path path = dir.path() / files::kDirectoryLock;
  // A live process on this host holding the flock (util-linux flock), with its own record.
  const long holder = start_background("flock -x " + path.string() + " sleep 30 > /dev/null 2>&1", dir.path() / "pid");
  REQUIRE(wait_for(path, 5));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // flock has taken it
  std::ofstream(path) << record_of(this_host(), holder);
  const auto message = user_error([&] { DirectoryLock::acquire(dir.path(), "checkpoint.save"); });
  CHECK_THAT(message, Contains("checkpoint.save") && Contains(fmt::format("pid {} on host {}", holder, this_host())) &&
                          Contains("job j1"));
  // kill -9 of the owner: the kernel drops its flock, the record stays behind, stale.
  run_command(fmt::format("pkill -9 -P {}; kill -9 {}", holder, holder));
  wait_gone(holder);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto lock = DirectoryLock::acquire(dir.path(), "checkpoint.save");
  CHECK(slurp(path.string()) == lock->record());
}

TEST_CASE("a lock recorded by another host is reported, not stolen", "[reliability][lock]") {
  TempDir dir;
  const fs::path path = dir.path() / files::kDirectoryLock;
  std::ofstream(path) << record_of("node-elsewhere-17", 4242);
  const auto message = user_error([&] { DirectoryLock::acquire(dir.path(), "logging.run_dir"); });
  CHECK_THAT(message, Contains("pid 4242 on host node-elsewhere-17") && Contains("another host") &&
                          Contains("delete " + path.string()));
  CHECK(slurp(path.string()) == record_of("node-elsewhere-17", 4242));
  // The other ranks of a job compare what they see with rank 0's record.
  CHECK_THAT(user_error([&] { check_directory_lock(dir.path(), record_of(this_host(), 1), "logging.run_dir"); }),
             Contains("this job's rank 0 holds it"));
  CHECK_NOTHROW(check_directory_lock(dir.path(), record_of("node-elsewhere-17", 4242), "logging.run_dir"));
  CHECK_NOTHROW(check_directory_lock(dir.path() / "unshared", "anything", "logging.run_dir"));
}

TEST_CASE("a lock of an earlier run of this Slurm job is taken over on any host but another job's is not",
          "[reliability][lock]") {
  // This process as restart 2 of Slurm job 777 (what sbatch --requeue sets); put back afterwards.
  struct SlurmEnv {
    SlurmEnv() {
      ::setenv("SLURM_JOB_ID", "777", 1);
      ::setenv("SLURM_RESTART_COUNT", "2", 1);
    }
    ~SlurmEnv() {
      ::unsetenv("SLURM_JOB_ID");
      ::unsetenv("SLURM_RESTART_COUNT");
    }
  } slurm;
  const auto slurm_record = [](const std::string& job, int restart) {
    return nlohmann::json{{"host", "node-elsewhere-17"}, {"pid", 4242}, {"job", job}, {"started", "2026-12-01T00:00:00Z"},
                          {"restart", restart}}
               .dump() +
           "\n";
  };
  TempDir dir;
  const fs::path path = dir.path() / files::kDirectoryLock;
  SECTION("restart 1 of the same job, on another node: ended before this run began") {
    std::ofstream(path) << slurm_record("777", 1);
    CHECK_NOTHROW(check_directory_free(dir.path(), "logging.run_dir"));  // what the dry run checks
    auto lock = DirectoryLock::acquire(dir.path(), "logging.run_dir");
    const auto record = nlohmann::json::parse(slurp(path.string()));
    CHECK(record["host"] == this_host());
    CHECK(record["job"] == "777");
    CHECK(record["restart"] == 2);
  }
  for (const auto& [job, restart] : std::vector<std::pair<std::string, int>>{{"777", 2}, {"777", 3}, {"778", 0}}) {
    // The same run (a second job step, or a clock of restarts this process has not seen), a later
    // one, or another job: any of them may still run.
    DYNAMIC_SECTION("job " << job << " restart " << restart << " is refused") {
      std::ofstream(path) << slurm_record(job, restart);
      const auto message = user_error([&] { DirectoryLock::acquire(dir.path(), "logging.run_dir"); });
      CHECK_THAT(message, Contains(fmt::format("job {}, Slurm restart {}", job, restart)) && Contains("another host"));
      CHECK_THAT(user_error([&] { check_directory_free(dir.path(), "logging.run_dir"); }), Contains("another host"));
      CHECK(slurp(path.string()) == slurm_record(job, restart));
    }
  }
  SECTION("a record without a restart count (outside Slurm) is refused") {
    std::ofstream(path) << record_of("node-elsewhere-17", 4242);
    CHECK_THAT(user_error([&] { DirectoryLock::acquire(dir.path(), "logging.run_dir"); }), Contains("another host"));
  }
}

TEST_CASE("only this process's and dead processes' temporaries are abandoned", "[reliability][lock]") {
  CHECK(is_abandoned_temporary(fmt::format("iter_0000004.tmp-{}", ::getpid())));
  CHECK_FALSE(is_abandoned_temporary("iter_0000004.tmp-1"));  // init: alive
  CHECK(is_abandoned_temporary("latest_checkpointed_iteration.txt.tmp-999999999"));
  CHECK_FALSE(is_abandoned_temporary("iter_0000004"));
  // A killed writer that nobody has reaped yet (a zombie) holds nothing either.
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(is_abandoned_temporary(fmt::format("iter_0000004.tmp-{}", child)));
  ::waitpid(child, nullptr, 0);
}

TEST_CASE("train: a second run into the same directories is refused at start-up, the first runs on intact",
          "[reliability][train]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = dir.path() / "ckpt", run = dir.path() / "run";
  const std::string args = fmt::format(
      " --set checkpoint.save={} --set logging.run_dir={} --set checkpoint.save_interval=1 --set training.train_iters=30",
      save.string(), run.string());
  // Another writer's live temporary in the save directory, and a dead one's.
  const long writer = start_background("sleep 60 > /dev/null 2>&1", dir.path() / "writer");
  fs::create_directories(save / fmt::format("iter_0000099.tmp-{}", writer));
  fs::create_directories(save / "iter_0000098.tmp-999999999");
  const auto log = dir.path() / "first.log";
  const long first = start_background(kBin + " train " + config + args + " > " + log.string() + " 2>&1", dir.path() / "pid");
  REQUIRE(wait_for(save / files::kDirectoryLock, 60));
  const auto second = run_command(kBin + " train " + config + args);
  INFO(second.output);
  CHECK(second.exit_code == 1);
  CHECK_THAT(second.output, Contains("in use by another run") && Contains(fmt::format("pid {}", first)) &&
                                Contains(run.string()));
  wait_gone(first);
  INFO(slurp(log.string()));
  const auto metrics = read_metrics(run / files::kMetrics);  // every line parses
  REQUIRE(metrics.size() == 30);
  for (size_t i = 0; i < metrics.size(); ++i) CHECK(metrics[i]["iteration"] == static_cast<int64_t>(i + 1));
  CHECK(slurp((save / files::kTracker).string()) == "30\n");
  CHECK(fs::exists(save / fmt::format("iter_0000099.tmp-{}", writer)));  // a live writer's: untouched
  CHECK_FALSE(fs::exists(save / "iter_0000098.tmp-999999999"));
  CHECK_FALSE(fs::exists(save / files::kDirectoryLock));  // released at the end
  CHECK_FALSE(fs::exists(run / files::kDirectoryLock));
  ::kill(static_cast<pid_t>(writer), SIGKILL);
}

TEST_CASE("train: a metrics.jsonl that cannot be written ends the run with its name, and a resume repairs a cut line",
          "[reliability][train]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto run = dir.path() / "run";
  train(config, "--set logging.run_dir=" + (dir.path() / "warm").string());  // the index cache, written unlimited
  // A file-size limit of a few KiB: the start-up files fit, metrics.jsonl outgrows it after a few lines.
  const auto limited = run_command("ulimit -f 8; " + kBin + " train " + config + " --set logging.run_dir=" + run.string());
  INFO(limited.output);
  CHECK(limited.exit_code == 1);
  CHECK_THAT(limited.output, Contains("cannot write " + (run / files::kMetrics).string()) &&
                                 Contains("File too large"));
  CHECK(fs::file_size(run / files::kMetrics) <= 8192);
  CHECK(fs::file_size(run / files::kMetrics) >= 2048);  // dash counts ulimit -f in 512-byte blocks, bash in KiB
  CHECK_THAT(limited.output, !Contains("trained iterations"));

  // A line cut short (as the full disk left it) is dropped on resume, with a warning.
  const auto save = dir.path() / "ckpt", run2 = dir.path() / "run2";
  const std::string args = fmt::format(" --set checkpoint.save={} --set logging.run_dir={} --set checkpoint.save_interval=2",
                                       save.string(), run2.string());
  train(config, args + " --set training.train_iters=3");
  std::ofstream(run2 / files::kMetrics, std::ios::app) << "{\"iteration\": 4, \"lm_lo";
  const auto resumed = train(config, args + " --set training.train_iters=4");
  CHECK_THAT(resumed, Contains("dropped 1 unreadable line") && Contains(files::kMetrics));
  const auto metrics = read_metrics(run2 / files::kMetrics);
  REQUIRE(metrics.size() == 4);
  for (size_t i = 0; i < metrics.size(); ++i) CHECK(metrics[i]["iteration"] == static_cast<int64_t>(i + 1));
}

TEST_CASE("train: a save directory whose tracker is gone is not saved over unless checkpoint.overwrite",
          "[reliability][train][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = dir.path() / "ckpt";
  const std::string args = fmt::format(" --set checkpoint.save={} --set logging.run_dir={} --set training.train_iters=2 --set training.lr_warmup_iters=1",
                                       save.string(), (dir.path() / "run").string());
  train(config, args);
  fs::remove(save / files::kTracker);
  const auto before = slurp((save / "iter_0000002" / files::kTrainerState).string());
  const auto refused = run_command(kBin + " train " + config + args);
  INFO(refused.output);
  CHECK(refused.exit_code == 1);
  CHECK_THAT(refused.output, Contains("iter_0000002") && Contains(files::kTracker) && Contains("checkpoint.overwrite"));
  CHECK(slurp((save / "iter_0000002" / files::kTrainerState).string()) == before);
  const auto dry = run_command(kBin + " train " + config + args + " --dry-run");
  CHECK(dry.exit_code == 1);
  CHECK_THAT(dry.output, Contains("checkpoint.overwrite"));
  train(config, args + " --set checkpoint.overwrite=true");
  CHECK(slurp((save / files::kTracker).string()) == "2\n");
}

TEST_CASE("train: a kill between the first save's rename and its tracker leaves a run that the advice resumes",
          "[reliability][train][checkpoint]") {
  // kill -9 at the exact instant, through the durable-write code's fault hook (core/files/durable_file.h).
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = dir.path() / "ckpt";
  const std::string args = fmt::format(" --set checkpoint.save={} --set logging.run_dir={} --set training.train_iters=4 "
                                       "--set training.lr_warmup_iters=1 --set checkpoint.save_interval=3",
                                       save.string(), (dir.path() / "run").string());
  const auto killed = run_command(std::string(kFaultEnv) + "=iter_0000003 " + kBin + " train " + config + args);
  INFO(killed.output);
  CHECK(killed.exit_code != 0);
  REQUIRE(fs::exists(save / "iter_0000003" / files::kTrainerState));
  REQUIRE_FALSE(fs::exists(save / files::kTracker));
  fs::copy(save, dir.path() / "ckpt2", fs::copy_options::recursive);

  // A plain rerun is still refused (it would start from scratch), and says what resumes it.
  const auto refused = run_command(kBin + " train " + config + args);
  INFO(refused.output);
  CHECK(refused.exit_code == 1);
  CHECK_THAT(refused.output, Contains("--load " + save.string() + ",") && Contains("--load " + save.string() + "/iter_0000003"));
  // Both pieces of advice work: the save directory (its newest complete checkpoint) ...
  const auto resumed = train(config, args + " --load " + save.string());
  CHECK_THAT(resumed, Contains("resuming its newest complete checkpoint"));
  CHECK_THAT(resumed, Contains("iteration 4/4") || Contains("iteration 4/"));
  CHECK(slurp((save / files::kTracker).string()) == "4\n");
  // ... and the checkpoint itself.
  const auto save2 = dir.path() / "ckpt2";
  const std::string args2 = fmt::format(" --set checkpoint.save={} --set logging.run_dir={} --set training.train_iters=4 "
                                        "--set training.lr_warmup_iters=1 --set checkpoint.save_interval=3",
                                        save2.string(), (dir.path() / "run2").string());
  train(config, args2 + " --load " + (save2 / "iter_0000003").string());
  CHECK(slurp((save2 / files::kTracker).string()) == "4\n");
  CHECK(read_metrics(dir.path() / "run2" / files::kMetrics).back()["lm_loss"] ==
        read_metrics(dir.path() / "run" / files::kMetrics).back()["lm_loss"]);
}

TEST_CASE("a dataset file truncated under a running job is named when its pages are gone (SIGBUS)",
          "[reliability][data]") {
  TempDir dir;
  const auto prefix = (dir.path() / "d").string();
  {
    data::IndexedDatasetBuilder b(prefix, data::TokenDType::int32);
    for (int d = 0; d < 8; ++d) b.add_document(std::vector<int64_t>(4096, d + 1));  // 128 KiB: many pages
    b.finalize();
  }
  const data::IndexedDataset dataset(prefix);
  std::vector<int64_t> out(4096);
  dataset.read(7, 0, 4096, out.data());  // mapped and readable
  REQUIRE(::truncate((prefix + ".bin").c_str(), 0) == 0);
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  const pid_t child = ::fork();
  if (child == 0) {  // only the read and the handler run here: nothing that allocates
    ::dup2(pipe_fds[1], STDERR_FILENO);
    dataset.read(7, 0, 4096, out.data());
    ::_exit(0);  // not reached: the page is gone
  }
  ::close(pipe_fds[1]);
  std::string message;
  char buf[512];
  for (ssize_t n; (n = ::read(pipe_fds[0], buf, sizeof(buf))) > 0;) message.append(buf, static_cast<size_t>(n));
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  INFO(message);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  CHECK_THAT(message, Contains(prefix + ".bin") && Contains("SIGBUS") && Contains("truncated"));
}

TEST_CASE("train: two identical runs save identical checkpoints, RNG state included", "[reliability][train][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  for (const char* run : {"a", "b"}) {
    train(config, fmt::format("--set training.train_iters=2 --set training.lr_warmup_iters=1 --set checkpoint.save={} --set logging.run_dir={}",
                              (dir.path() / run / "ckpt").string(), (dir.path() / run / "run").string()));
  }
  for (const char* file : {files::kSafetensors, files::kOptimizer}) {
    INFO(file);
    const auto a = slurp((dir.path() / "a/ckpt/iter_0000002" / file).string());
    const auto b = slurp((dir.path() / "b/ckpt/iter_0000002" / file).string());
    REQUIRE_FALSE(a.empty());
    CHECK(a == b);
  }
}

TEST_CASE("train: a bf16 checkpoint's weights stored as another floating type are refused on resume",
          "[reliability][train][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = dir.path() / "ckpt";
  const std::string common = " --set training.bf16=true --set training.lr_warmup_iters=1 --set checkpoint.save=" + save.string() +
                             " --set logging.run_dir=" + (dir.path() / "run").string();
  train(config, common + " --set training.train_iters=2");
  const auto path = save / "iter_0000002" / files::kSafetensors;
  auto bytes = slurp(path.string());
  const auto at = bytes.find("\"BF16\"");  // F16 has the same size: only the recorded precision tells them apart
  REQUIRE(at != std::string::npos);
  bytes.replace(at, 6, "\"F16\" ");
  std::ofstream(path, std::ios::binary) << bytes;
  const auto r = run_command(kBin + " train " + config + common + " --set training.train_iters=4");
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains(path.string()) && Contains("is stored as F16") && Contains("saved in BF16"));
}

TEST_CASE("train: kill -9 of every rank at random moments of sharded EP 2 saves, and every resume continues bit for bit",
          "[reliability][train][checkpoint][mpi][slow]") {
  TempDir dir;
  const auto config = write_config(dir);
  // A larger vocabulary makes each save long enough (~30 MB per checkpoint) to be caught inside.
  const std::string layout = " --set model.vocab_size=16384 --set parallel.expert_model_parallel_size=2 "
                             "--set checkpoint.format=sharded --set checkpoint.save_interval=1 --set training.train_iters=10 "
                             "--set training.lr_decay_iters=10";
  auto args_for = [&](const std::string& name) {
    return layout + " --set checkpoint.save=" + (dir.path() / name / "ckpt").string() +
           " --set logging.run_dir=" + (dir.path() / name / "run").string();
  };
  const std::string mpi2 = kMpirun + " -np 2 " + kBin + " train " + config;
  const auto reference_run = run_command(mpi2 + args_for("reference"));
  INFO(reference_run.output);
  REQUIRE(reference_run.exit_code == 0);
  const auto reference = read_metrics(dir.path() / "reference/run" / files::kMetrics);
  REQUIRE(reference.size() == 10);

  std::mt19937 rng(20261201);
  int caught_in_save = 0;
  for (int attempt = 0; attempt < 6; ++attempt) {
    const std::string name = fmt::format("attempt{}", attempt);
    const auto save = dir.path() / name / "ckpt";
    const long launcher = start_background(mpi2 + args_for(name) + " > " + (dir.path() / (name + ".log")).string() + " 2>&1",
                                           dir.path() / (name + ".pid"));
    // Even attempts: the moment a save is in flight, plus 0-5 ms; odd ones: any moment of the run.
    bool in_save = false;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    const auto moment = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500 + rng() % 6000);
    while (std::chrono::steady_clock::now() < deadline) {
      if (attempt % 2 == 1 && std::chrono::steady_clock::now() > moment) break;
      if (attempt % 2 == 0 && fs::exists(save)) {
        for (const auto& e : fs::directory_iterator(save)) in_save |= e.path().filename().string().find(".tmp-") != std::string::npos;
        if (in_save) {
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 5000));
          break;
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
    const std::string marker = (dir.path() / name).string();
    run_command("pkill -9 -f " + marker + "; kill -9 " + std::to_string(launcher) + " 2>/dev/null; while pgrep -f " +
                marker + " > /dev/null; do sleep 0.05; done");
    caught_in_save += in_save;

    INFO(name << " killed " << (in_save ? "during a save" : "at a random moment") << "\n" << slurp((dir.path() / (name + ".log")).string()));
    const bool tracked = fs::exists(save / files::kTracker);
    const int64_t latest = tracked ? std::stol(slurp((save / files::kTracker).string())) : 0;
    const auto resumed = run_command(mpi2 + args_for(name));
    INFO(resumed.output);
    REQUIRE(resumed.exit_code == 0);
    if (tracked && latest < 10) CHECK_THAT(resumed.output, Contains(fmt::format("at iteration {}", latest)));
    const auto metrics = read_metrics(dir.path() / name / "run" / files::kMetrics);
    REQUIRE(metrics.size() == 10);
    for (size_t i = 0; i < 10; ++i) CHECK(without_timing(metrics[i]).dump() == without_timing(reference[i]).dump());
    for (const auto& e : fs::directory_iterator(save)) CHECK_THAT(e.path().filename().string(), !Contains(".tmp-"));
  }
  CHECK(caught_in_save >= 2);
}

TEST_CASE("user errors are user errors: directories as files, sizes beyond memory or 64 bits, bad command lines",
          "[reliability][errors]") {
  TempDir dir;
  const auto config = write_config(dir);
  auto refused = [&](const std::string& args, const std::vector<std::string>& words) {
    const auto r = run_command(kBin + " " + args);
    INFO(args << "\n" << r.output);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, !Contains("internal error"));
    for (const auto& w : words) CHECK_THAT(r.output, Contains(w));
  };
  refused("train " + dir.path().string(), {"is a directory, not a config file"});
  refused("data preprocess --input " + dir.path().string() + " --tokenizer byte --output-prefix " +
              (dir.path() / "out").string(),
          {"--input " + dir.path().string() + " is a directory"});
  refused("train " + config + " --dry-run --world-size 0", {"--world-size", "at least 1, got 0"});
  const auto duplicated = dir.file("dup.yaml", "base: " + config + "\ntraining:\n  lr: 1.0e-3\n  lr: 2.0e-3\n");
  refused("plan " + duplicated, {"dup.yaml:4", "`training.lr` appears twice (first at line 3)"});
  // Sizes the machine cannot hold are refused with the planner's number before anything is allocated.
  for (const char* size : {"model.hidden_size=1048576", "model.vocab_size=2000000000",
                           "model.num_layers=65536 --set model.hidden_size=8192"}) {
    refused("train " + config + " --set " + size, {"the memory plan needs", "GiB per rank", "this host has"});
  }
  // Beyond any real model, a size is a typo: refused before the planner loops over 10^8 layers.
  refused("train " + config + " --set model.num_layers=100000000",
          {"model.num_layers is 100000000, above the largest supported, 65536"});
  refused("train " + config + " --set training.seq_length=100000000", {"beyond 64-bit integers"});
  // 2^62 samples per step: refused by the config's own bound on the samples a run spans (2^53).
  refused("train " + config + " --set training.global_batch_size=4611686018427387904",
          {"training.global_batch_size (4611686018427387904) x training.train_iters (30) is above 2^53 samples"});
  // Products of config integers are checked wherever they are formed: PP x TP = 2^64 wrapped to 0
  // and divided by it (SIGFPE, exit 136), micro-batch x DP printed as -9223372036854775808, and
  // 2^62 layers spun in the parameter count. Sizes beyond any real run are refused by name.
  for (const std::string& command : {"plan " + config, "train " + config + " --dry-run", "train " + config}) {
    refused(command + " --set parallel.pipeline_model_parallel_size=4294967296 --set parallel.tensor_model_parallel_size=4294967296",
            {"parallel.pipeline_model_parallel_size is 4294967296, above 1048576",
             "parallel.tensor_model_parallel_size is 4294967296, above 1048576"});
    refused(command + " --set model.num_layers=4611686018427387904", {"model.num_layers is 4611686018427387904, above the largest supported, 65536"});
  }
  for (const std::string& command : {"plan " + config, "train " + config + " --dry-run"}) {
    refused(command + " --world-size 4 --set training.micro_batch_size=4611686018427387904",
            {"beyond 64-bit integers", "training.* (global_batch_size, micro_batch_size"});
  }
  // An overflowing learning rate (finite in fp32, 1e38) stops the run as a user error, naming the setting.
  refused("train " + config + " --set training.lr=1e38 --set training.train_iters=3", {"is nan", "Lower training.lr"});
  // Token ids must be integers (1.5 used to be read as 1).
  const auto tokens = dir.file("tokens.json", "[[1.5, 2]]");
  refused("forward --checkpoint " + dir.path().string() + " --tokens " + tokens, {"token id 1.5 is not an integer"});
  // `--set key=` is the empty string, as `key: ""` is.
  const auto empty = run_command(kBin + " config " + config + " --set checkpoint.save= --yaml");
  INFO(empty.output);
  CHECK(empty.exit_code == 0);
}

TEST_CASE("convert never writes into or beside its source checkpoint", "[reliability][errors][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = dir.path() / "ckpt";
  train(config, "--set training.train_iters=2 --set training.lr_warmup_iters=1 --set checkpoint.save=" + save.string() +
                    " --set logging.run_dir=" + (dir.path() / "run").string());
  const auto before = slurp((save / "iter_0000002" / files::kSafetensors).string());
  for (const auto& [target, why] : std::vector<std::pair<fs::path, std::string>>{
           {save, "the save directory of"},
           {save / "iter_0000002", "inside the checkpoint"},
           {save / "iter_0000002/", "inside the checkpoint"},
           {save / "iter_0000002" / "sub", "inside the checkpoint"},
           {save / "iter_0000009", "beside"}}) {
    const auto r = run_command(kBin + " convert " + save.string() + " " + target.string());
    INFO(target << "\n" << r.output);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains(why) && Contains("another directory"));
  }
  CHECK(slurp((save / "iter_0000002" / files::kSafetensors).string()) == before);
  CHECK_FALSE(fs::exists(save / "iter_0000009"));
  const auto r = run_command(kBin + " convert " + save.string() + " " + (dir.path() / "converted").string());
  INFO(r.output);
  CHECK(r.exit_code == 0);
}

TEST_CASE("convert takes its target's lock and neither replaces a checkpoint nor rewinds a tracker without --overwrite",
          "[reliability][errors][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = dir.path() / "ckpt", target = dir.path() / "target";
  train(config, "--set training.train_iters=2 --set training.lr_warmup_iters=1 --set checkpoint.save=" + save.string() +
                    " --set logging.run_dir=" + (dir.path() / "run").string());
  auto convert = [&](const std::string& extra) {
    return run_command(kBin + " convert " + save.string() + " " + target.string() + extra);
  };
  {
    // A live run (here: this process) holds the target: refused, naming the holder; nothing written.
    const auto held = DirectoryLock::acquire(target, "checkpoint.save");
    const auto r = convert("");
    INFO(r.output);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("in use by another run") && Contains(std::to_string(::getpid())));
    CHECK_FALSE(fs::exists(target / "iter_0000002"));
  }
  REQUIRE(convert("").exit_code == 0);
  const auto first = slurp((target / "iter_0000002" / files::kTrainerState).string());
  // The same iteration again: refused; with --overwrite, replaced.
  const auto again = convert("");
  INFO(again.output);
  CHECK(again.exit_code == 1);
  CHECK_THAT(again.output, Contains("iter_0000002") && Contains("--overwrite"));
  CHECK(slurp((target / "iter_0000002" / files::kTrainerState).string()) == first);
  CHECK(convert(" --overwrite").exit_code == 0);
  // A target whose tracker is further along (a run that went on there): not moved back.
  { std::ofstream(target / files::kTracker) << "150\n"; }
  fs::remove_all(target / "iter_0000002");
  const auto back = convert("");
  INFO(back.output);
  CHECK(back.exit_code == 1);
  CHECK_THAT(back.output, Contains("names iteration 150") && Contains("move it back"));
  CHECK(slurp((target / files::kTracker).string()) == "150\n");
  CHECK(convert(" --overwrite").exit_code == 0);
  CHECK(slurp((target / files::kTracker).string()) == "2\n");
}

TEST_CASE("train: a killed run's temporaries in the run directory are removed at start-up, a live writer's kept",
          "[reliability][train]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto run = dir.path() / "run";
  fs::create_directories(run);
  // What a kill during the durable write of environment.json leaves; and a live process's file.
  std::ofstream(run / "environment.json.tmp-999999999") << "{\"cut";
  const long writer = start_background("sleep 60 > /dev/null 2>&1", dir.path() / "writer");
  const auto live = run / fmt::format("plan.json.tmp-{}", writer);
  std::ofstream(live) << "{";
  const auto r = run_command(kBin + " train " + config + " --set training.train_iters=1 --set training.lr_warmup_iters=0 --set training.eval_iters=0");
  INFO(r.output);
  CHECK(r.exit_code == 0);
  CHECK_FALSE(fs::exists(run / "environment.json.tmp-999999999"));
  CHECK(fs::exists(run / files::kEnvironment));
  CHECK(fs::exists(live));
  ::kill(static_cast<pid_t>(writer), SIGKILL);
}

TEST_CASE("train: output paths the kernel would refuse are refused at start-up, not at the first save",
          "[reliability][train][errors]") {
  // A 4,060-character save path passed the start-up checks and failed at the first save.
  TempDir dir;
  const auto config = write_config(dir);
  std::string deep = dir.path().string();
  while (deep.size() < 4060) deep += "/" + std::string(200, 'd');
  const std::string long_name = dir.path().string() + "/" + std::string(300, 'n');
  for (const std::string& mode : {std::string(" --dry-run"), std::string(" --set training.train_iters=1 --set training.lr_warmup_iters=0")}) {
    const auto whole = run_command(kBin + " train " + config + mode + " --set checkpoint.save=" + deep);
    INFO(whole.output);
    CHECK(whole.exit_code == 1);
    CHECK_THAT(whole.output, Contains("checkpoint.save") && Contains("(PATH_MAX). Choose a path shorter than"));
    const auto name = run_command(kBin + " train " + config + mode + " --set logging.run_dir=" + long_name);
    INFO(name.output);
    CHECK(name.exit_code == 1);
    CHECK_THAT(name.output, Contains("logging.run_dir") && Contains("has 300 characters, above the 255 a file name may have"));
  }
  CHECK_FALSE(fs::exists(dir.path() / std::string(200, 'd')));  // nothing created
}

TEST_CASE("a directory replaced whole: exchanged in, and an interrupted two-rename replacement put back",
          "[reliability][checkpoint]") {
  TempDir dir;
  const auto write = [](const fs::path& d, const std::string& text) {
    fs::create_directories(d);
    std::ofstream(d / "f") << text;
  };
  const auto read = [](const fs::path& d) { return slurp((d / "f").string()); };
  const fs::path target = dir.path() / "iter_0000002";
  // Missing target: a rename. Existing target: exchanged, the old copy removed.
  write(dir.path() / "new.tmp-1", "first");
  replace_dir_durably(dir.path() / "new.tmp-1", target);
  CHECK(read(target) == "first");
  write(dir.path() / "new.tmp-2", "second");
  replace_dir_durably(dir.path() / "new.tmp-2", target);
  CHECK(read(target) == "second");
  CHECK(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()) == 1);

  // A kill between the fallback's two renames leaves the target missing and its complete old copy
  // under a temporary name of a process that is gone: the start-up's cleanup puts it back instead
  // of removing it; beside a present target the old copy is garbage.
  const long dead = std::stol(run_command("sh -c 'echo $$'").output);
  fs::rename(target, dir.path() / fmt::format("iter_0000002.old.tmp-{}", dead));
  write(dir.path() / fmt::format("iter_0000003.old.tmp-{}", dead), "stale");
  write(dir.path() / "iter_0000003", "current");
  remove_abandoned_temporaries(dir.path());
  CHECK(read(target) == "second");
  CHECK(read(dir.path() / "iter_0000003") == "current");
  CHECK(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()) == 2);
}
