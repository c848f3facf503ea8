// The device path on the emulated accelerator (core/device/emulated): the training runtime's
// accelerator code (device selection, events, the generic allocator's statistics, host-device
// copies) run in CI without a GPU, each test against the CPU run of the same code or a closed form.
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;

namespace {

std::vector<nlohmann::json> train_on(const std::string& config, const TempDir& dir, const std::string& name,
                                     const std::string& device, const std::string& extra = "") {
  train(config, fmt::format("--set hardware.device={} --set model.kernels=reference --set training.train_iters=3 "
                            "--set training.eval_iters=0 --set logging.run_dir={} {}",
                            device, (dir.path() / name).string(), extra));
  return read_metrics(dir.path() / name / "metrics.jsonl");
}

// What a device run adds or measures differently: its memory (the allocator's, not the host's).
nlohmann::json comparable(nlohmann::json j) {
  j = without_timing(std::move(j));
  for (const char* key : {metric::kPeakMemoryAllocated, metric::kPeakMemoryReserved, metric::kDeviceMemoryTotal,
                          metric::kStepPeakMemoryAllocated, metric::kStepPeakMemoryReserved,
                          metric::kSavePeakMemoryAllocated, metric::kSavePeakMemoryReserved}) {
    j.erase(key);
  }
  return j;
}

}  // namespace

TEST_CASE("training steps on the emulated device equal the CPU's bit for bit, with the same host syncs",
          "[device][train]") {
  TempDir dir;
  const auto config = write_config(dir);
  for (const bool bf16 : {false, true}) {
    INFO((bf16 ? "bf16" : "fp32"));
    const std::string precision = fmt::format("--set training.bf16={}", bf16);
    const auto cpu = train_on(config, dir, fmt::format("cpu{}", bf16), "cpu", precision);
    const auto emulated = train_on(config, dir, fmt::format("emulated{}", bf16), "emulated", precision);
    REQUIRE(cpu.size() == 3);
    REQUIRE(emulated.size() == 3);
    for (size_t i = 0; i < 3; ++i) {
      INFO("iteration " << i + 1 << "\ncpu      " << comparable(cpu[i]).dump() << "\nemulated " << comparable(emulated[i]).dump());
      // Every loss, norm, count and host sync: the same kernels on the same bytes in the same order.
      CHECK(comparable(cpu[i]) == comparable(emulated[i]));
      // The device's memory, read through LibTorch's generic allocator call as on CUDA.
      CHECK(emulated[i].value(metric::kPeakMemoryAllocated, int64_t{0}) > 0);
      CHECK(emulated[i].value(metric::kPeakMemoryReserved, int64_t{0}) >= emulated[i].value(metric::kPeakMemoryAllocated, int64_t{0}));
      CHECK(emulated[i].value(metric::kDeviceMemoryTotal, int64_t{0}) == int64_t{80} << 30);
      CHECK(cpu[i].value(metric::kPeakMemoryReserved, int64_t{0}) == 0);
    }
  }
}

TEST_CASE("an emulated device too small for the plan is refused before anything is allocated", "[device][errors]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto r = run_command(kBin + " train " + config + " --set hardware.device=emulated --set hardware.emulated_memory_gib=0.001 " +
                             "--set logging.run_dir=" + (dir.path() / "small").string());
  INFO(r.output);
  CHECK(r.exit_code == 1);
  // The device's total came from the emulator's allocator through the generic call (device_memory).
  CHECK_THAT(r.output, Contains("the memory plan needs") && Contains("but the device has"));
}

TEST_CASE("more ranks on a node than emulated devices: refused naming both counts, before any communicator",
          "[device][errors][mpi]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto r = run_command(kMpirun + " -np 2 " + kBin + " train " + config +
                             " --set hardware.device=emulated --set hardware.emulated_devices_per_node=1 --set logging.run_dir=" +
                             (dir.path() / "ranks").string());
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK_THAT(r.output, Contains("this node runs 2 ranks but only 1 emulated device(s)"));
}

TEST_CASE("the dry run describes the emulated device without loading it, and a missing backend library is a problem",
          "[device][cli]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto ok = run_command(kBin + " train " + config + " --set hardware.device=emulated --dry-run");
  INFO(ok.output);
  CHECK(ok.exit_code == 0);
  CHECK_THAT(ok.output, Contains("ok       hardware.device: emulated: one device per local rank per node, 80 GiB each"));
  const auto missing = run_command(kBin + " train " + config +
                                   " --set hardware.device=emulated --set hardware.device_library=/nonexistent/libx.so --dry-run");
  CHECK(missing.exit_code == 1);
  CHECK_THAT(missing.output, Contains("hardware.device_library: /nonexistent/libx.so does not exist"));
  const auto unknown = run_command(kBin + " train " + config + " --set hardware.device=tpu_v9 --set logging.run_dir=" + (dir.path() / "tpu").string());
  CHECK(unknown.exit_code == 1);
  CHECK_THAT(unknown.output, Contains("hardware.device is 'tpu_v9', a device type LibTorch does not know"));
}

TEST_CASE("the kernel self-check runs and compares on the emulated device, and keeps its fused kernels",
          "[device][kernels]") {
  TempDir dir;
  const auto config = write_config(dir);
  // bf16: the fused weight-gradient accumulation (a LibTorch composition, so available on any
  // accelerator) is checked on the device against its reference, both read back to the host.
  const auto out = train(config, "--set hardware.device=emulated --set model.kernels=fused --set training.bf16=true "
                                 "--set training.train_iters=3 --set training.eval_iters=0 --set logging.run_dir=" +
                                     (dir.path() / "fused").string());
  CHECK_THAT(out, Contains("kernel self-check on emulated:0: 2 checks"));
  CHECK_THAT(out, !Contains("runs from now on"));  // no kernel switched to its reference
}

TEST_CASE("saves on the emulated device add at most one tensor to its peak, and resume bit for bit (whole and sharded)",
          "[device][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  // The fixture's largest tensor: a layer's 8 experts' stacked gate/up weight, 8 x 64 x 64 in fp32.
  // A save goes to the host one tensor (or bucket) at a time, so it may add that much to the device's
  // peak and no more (it once gathered every bucket's state and every expert at once).
  constexpr int64_t kLargestUnit = 8 * 64 * 64 * 4;
  const std::string steps = "--set training.train_iters=4 --set training.lr_warmup_iters=1";
  const auto plain = train_on(config, dir, "plain", "emulated", steps);
  REQUIRE(plain.size() == 4);
  for (const std::string format : {"whole", "sharded"}) {
    INFO("checkpoint.format: " << format);
    const auto save = (dir.path() / ("ckpt_" + format)).string();
    const auto saving = train_on(config, dir, "saving_" + format, "emulated",
                                 steps + " --set checkpoint.save_interval=2 --set checkpoint.format=" + format +
                                     " --set checkpoint.save=" + save);
    REQUIRE(saving.size() == 4);
    for (size_t i = 0; i < 4; ++i) {
      INFO("iteration " << i + 1);
      CHECK(comparable(saving[i]) == comparable(plain[i]));  // a save changes nothing
      const auto peak = saving[i].value(metric::kPeakMemoryAllocated, int64_t{0});
      const auto plain_peak = plain[i].value(metric::kPeakMemoryAllocated, int64_t{0});
      CHECK(plain_peak > 0);
      CHECK(peak <= plain_peak + kLargestUnit);
      // Per-step peaks: the allocator's peak is reset as each step starts, so a step's own peak is
      // the same with or without saves between steps, never above the since-start peak, and the
      // since-start peak (Megatron's mem-max-allocated-bytes) never goes down.
      const auto step = saving[i].value(metric::kStepPeakMemoryAllocated, int64_t{0});
      CHECK(step > 0);
      CHECK(step == plain[i].value(metric::kStepPeakMemoryAllocated, int64_t{-1}));
      CHECK(step <= peak);
      CHECK(saving[i].value(metric::kStepPeakMemoryReserved, int64_t{0}) <= saving[i].value(metric::kPeakMemoryReserved, int64_t{0}));
      if (i > 0) CHECK(peak >= saving[i - 1].value(metric::kPeakMemoryAllocated, int64_t{0}));
      // The save after iteration 2 is reported once, on iteration 3, within the since-start peak.
      CHECK(saving[i].contains(metric::kSavePeakMemoryAllocated) == (i == 2));
      if (i == 2) CHECK(saving[i].value(metric::kSavePeakMemoryAllocated, int64_t{-1}) <= peak);
      CHECK_FALSE(plain[i].contains(metric::kSavePeakMemoryAllocated));
    }
    const auto resumed = train_on(config, dir, "resumed_" + format, "emulated",
                                  steps + " --load " + save + "/iter_0000002");
    REQUIRE(resumed.size() == 2);
    for (size_t i = 0; i < 2; ++i) CHECK(comparable(resumed[i]) == comparable(plain[i + 2]));
  }
}
