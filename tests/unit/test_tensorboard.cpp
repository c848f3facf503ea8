// TensorBoard event files (logging.tensorboard_dir, issue 20), read back by the tensorboard package
// (tests/oracles/tensorboard_oracle.py) and compared with metrics.jsonl.
#include "core/files/dir_lock.h"
#include "core/files/file_names.h"
#include "launch/train/tensorboard.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <sys/resource.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

json read_events(const fs::path& dir) {
  const auto out = run_oracle("tensorboard_oracle.py", dir.string());
  return json::parse(out.substr(out.rfind("{\"records\"")));
}

// Megatron's tags (and ours where Megatron has none) -> the metrics.jsonl key of the same value.
const std::map<std::string, std::string> kExpected = {
    {"lm loss", "lm_loss"},
    {"load_balancing_loss", "load_balancing_loss"},
    {"z_loss", "z_loss"},
    {"aux_loss", "aux_loss"},
    {"total loss", "loss"},
    {"learning-rate", "lr"},
    {"grad-norm", "grad_norm"},
    {"skipped-iterations", "skipped_iterations"},
    {"consumed-samples", "consumed_samples"},
    {"iteration-time", "step_time_s"},
    {"throughput", "tflops_per_device"},
    {"throughput-6n", "tflops_6n_per_device"},
    {"tokens-per-second-per-device", "tokens_per_s_per_device"},
    {"mfu", "mfu"},
    {"mfu-6n", "mfu_6n"},
    {"host-syncs", "host_syncs"},
    {"host-max-resident-bytes", "peak_memory_bytes"},
    {"expert-load-max-over-mean", "expert_load_max_over_mean"},
};

}  // namespace

#if MOEFORGE_WITH_TENSORBOARD
TEST_CASE("tensorboard: CRC-32C and TFRecord framing", "[tensorboard]") {
  // The CRC-32C check value of "123456789" is 0xE3069283 (RFC 3720, B.4); TFRecord masks it.
  const uint32_t crc = 0xE3069283u;
  CHECK(masked_crc32c("123456789") == ((crc >> 15) | (crc << 17)) + 0xA282EAD8u);
  const std::string record = tfrecord_record("abc");
  REQUIRE(record.size() == 8 + 4 + 3 + 4);
  CHECK(record.substr(0, 8) == std::string("\x03\0\0\0\0\0\0\0", 8));
  CHECK(record.substr(12, 3) == "abc");
}
#endif

TEST_CASE("train: TensorBoard sees every logged step with metrics.jsonl's values, and a resume replaces what it redoes",
          "[tensorboard][train]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto tb = dir.path() / "tb";
  const auto run = dir.path() / "run";
  const auto save = dir.path() / "save";
  const std::string args = fmt::format(
      "--set logging.tensorboard_dir={} --set logging.run_dir={} --set checkpoint.save={} --set logging.log_interval=2 "
      "--set training.eval_interval=3 --set training.lr_warmup_iters=1 --set checkpoint.save_interval=2 "
      "--set model.moe_router_load_balancing_type=aux_loss --set model.moe_z_loss_coeff=0.001",
      tb.string(), run.string(), save.string());
  const auto out = train(config, args + " --set training.train_iters=6");
  CHECK_THAT(out, Contains("TensorBoard: " + tb.string() + "/events.out.tfevents."));
  CHECK_THAT(out, Contains("| load_balancing_loss: ") && Contains("| z_loss: "));  // Megatron's log line names
  const auto metrics = read_metrics(run / "metrics.jsonl");
  REQUIRE(metrics.size() == 6);
  for (const auto& line : metrics) {
    // Megatron-Core's track_moe_metrics: each MoE loss without its coefficient, summed over the
    // MoE layers and divided by their number (2 here); the total adds the coefficients times the sums.
    CHECK(line["load_balancing_loss"].get<double>() == Approx(line["aux_loss"].get<double>() / 2).epsilon(1e-12));
    CHECK(line["loss"].get<double>() == Approx(line["lm_loss"].get<double>() + 0.01 * line["aux_loss"].get<double>() +
                                               0.001 * 2 * line["z_loss"].get<double>()).epsilon(1e-6));  // fp32 per micro-batch
    CHECK_FALSE(line.contains("seq_load_balancing_loss"));
  }

  auto check_against_metrics = [&](const json& events, const std::vector<json>& lines) {
    const auto& scalars = events["scalars"];
    for (const auto& [tag, key] : kExpected) {
      INFO(tag);
      REQUIRE(scalars.contains(tag));
      // Logged iterations: every log_interval-th and the last; written as TensorBoard's fp32.
      std::vector<int64_t> steps;
      for (const auto& e : scalars[tag]) {
        const int64_t step = e[0].get<int64_t>();
        steps.push_back(step);
        const auto& line = lines[static_cast<size_t>(step - 1)];
        CHECK(e[1].get<double>() == static_cast<double>(static_cast<float>(line[key].get<double>())));
      }
      CHECK(steps == std::vector<int64_t>{2, 3, 4, 6});  // 3: an evaluation (eval_interval 3)
    }
    // Per MoE layer load, and validation where it ran.
    for (int l = 0; l < 2; ++l) {
      const auto tag = fmt::format("moe/expert_load_max_over_mean_layer_{}", l);
      REQUIRE(scalars.contains(tag));
      for (const auto& e : scalars[tag]) {
        const auto& line = lines[static_cast<size_t>(e[0].get<int64_t>() - 1)];
        CHECK(e[1].get<double>() == static_cast<double>(static_cast<float>(line["expert_load_per_layer"][l].get<double>())));
      }
    }
    REQUIRE(scalars.contains("lm loss validation"));
    std::vector<int64_t> eval_steps;
    for (const auto& e : scalars["lm loss validation"]) {
      eval_steps.push_back(e[0].get<int64_t>());
      const auto& line = lines[static_cast<size_t>(e[0].get<int64_t>() - 1)];
      CHECK(e[1].get<double>() == static_cast<double>(static_cast<float>(line["valid_lm_loss"].get<double>())));
    }
    CHECK(eval_steps == std::vector<int64_t>{3, 6});
    CHECK(scalars.contains("lm loss validation ppl"));
  };
  const auto first = read_events(tb);
  CHECK(first["files"] == 1);
  CHECK(first["records"] == 2 + 4);  // file version, session start, then one event per written step
  check_against_metrics(first, metrics);

  // A run killed after iteration 6 whose last checkpoint is iteration 4: the resumed run logs 5 and
  // 6 again into a new file, and TensorBoard shows each step once, from the resumed run.
  fs::remove_all(save / "iter_0000006");
  { std::ofstream(save / "latest_checkpointed_iteration.txt") << "4"; }
  train(config, args + " --set training.train_iters=6");
  const auto resumed_metrics = read_metrics(run / "metrics.jsonl");
  const auto second = read_events(tb);
  CHECK(second["files"] == 2);
  check_against_metrics(second, resumed_metrics);
}

TEST_CASE("train: a TensorBoard directory that cannot be written is refused before training", "[tensorboard][train]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto file = dir.file("not_a_dir", "x");
  const auto r = run_command(kBin + " train " + config + " --set logging.tensorboard_dir=" + file);
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("logging.tensorboard_dir"));
  CHECK_THAT(r.output, !Contains("iteration        1/"));
}

#if MOEFORGE_WITH_TENSORBOARD
TEST_CASE("tensorboard: a write that fails part-way (a full disk) leaves no cut record at the file's end", "[tensorboard]") {
  TempDir dir;
  // A file-size limit cuts a record part-way, as a full disk does; with SIGXFSZ ignored it is an error.
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit old_limit{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  {
    TensorBoardWriter writer(dir.path().string(), 0);
    rlimit small = old_limit;
    small.rlim_cur = 500;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    for (int step = 1; step <= 20; ++step) writer.add_scalars(step, {{"lm loss", 1.0 * step}, {"learning-rate", 2.0}});
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  }
  std::signal(SIGXFSZ, old_handler);
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir.path())) files.push_back(entry.path());
  REQUIRE(files.size() == 1);
  const std::string bytes = slurp(files[0].string());
  // TFRecord framing: 8-byte length, 4-byte CRC, payload, 4-byte CRC; the file ends on a record's end.
  size_t at = 0, records = 0;
  while (at + 8 <= bytes.size()) {
    uint64_t length = 0;
    std::memcpy(&length, bytes.data() + at, 8);
    at += 8 + 4 + length + 4;
    ++records;
  }
  CHECK(at == bytes.size());
  CHECK(records >= 3);  // the version, the start and at least one step
  CHECK(bytes.size() <= 500);
}
#endif

#if MOEFORGE_WITH_TENSORBOARD
TEST_CASE("train: the TensorBoard directory is one run's, and a dry run refuses what train refuses there",
          "[tensorboard][train][reliability]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto tb = dir.path() / "tb";
  const std::string use_tb = " --set logging.tensorboard_dir=" + tb.string();
  // Held by a live run on this host (this test process): train and the dry run refuse, naming it.
  {
    const auto lock = DirectoryLock::acquire(tb, "logging.tensorboard_dir");
    for (const std::string& args : {std::string(" --dry-run"), std::string(" --set training.train_iters=1 --set training.lr_warmup_iters=0")}) {
      const auto r = run_command(kBin + " train " + config + use_tb + args);
      INFO(r.output);
      CHECK(r.exit_code == 1);
      CHECK_THAT(r.output, Contains("logging.tensorboard_dir " + tb.string() + " is in use by another run") &&
                               Contains(fmt::format("pid {}", ::getpid())));
    }
  }
  // Recorded by a run on another host: refused by the dry run as by train, the record kept.
  const std::string elsewhere =
      nlohmann::json{{"host", "node-elsewhere-17"}, {"pid", 4242}, {"job", "j1"}, {"started", "2026-12-01T00:00:00Z"}}.dump() +
      "\n";
  std::ofstream(tb / files::kDirectoryLock) << elsewhere;
  const auto dry = run_command(kBin + " train " + config + use_tb + " --dry-run");
  INFO(dry.output);
  CHECK(dry.exit_code == 1);
  CHECK_THAT(dry.output, Contains("PROBLEM  logging.tensorboard_dir") && Contains("pid 4242 on host node-elsewhere-17"));
  CHECK(slurp((tb / files::kDirectoryLock).string()) == elsewhere);
  fs::remove(tb / files::kDirectoryLock);
  // A run holds the directory while it trains and releases it at the end.
  const auto ran = run_command(kBin + " train " + config + use_tb + " --set training.train_iters=2 --set training.lr_warmup_iters=0 --set training.eval_iters=0");
  INFO(ran.output);
  CHECK(ran.exit_code == 0);
  CHECK_FALSE(fs::exists(tb / files::kDirectoryLock));
  // On a read-only file system (a tmpfs mounted read-only in a mount namespace of its own): the dry
  // run said "ok" where train refused.
  const auto ro = dir.path() / "ro";
  fs::create_directories(ro);
  const auto mounted = run_command("unshare -m sh -c 'mount -t tmpfs -o ro tmpfs " + ro.string() + " && " + kBin +
                                   " train " + config + " --dry-run --set logging.tensorboard_dir=" + (ro / "tb").string() +
                                   "'");
  if (mounted.output.find("mount:") != std::string::npos || mounted.output.find("unshare:") != std::string::npos) {
    WARN("SKIPPED: the read-only file system case needs mount namespaces (root): " << mounted.output);
  } else {
    INFO(mounted.output);
    CHECK(mounted.exit_code == 1);
    CHECK_THAT(mounted.output, Contains("PROBLEM  logging.tensorboard_dir") && Contains("Read-only file system"));
  }
}
#endif
