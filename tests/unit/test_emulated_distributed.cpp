// Multi-rank training on the emulated accelerator: every device collective goes through the
// host-staged communicator (parallel/comm/host_staged_communicator.h) on its own stream, with
// communication overlapped with compute and the stream-order checker on. One layout per
// communication path (the asynchronous expert all-to-all, DP buckets with ZeRO-1, interleaved
// pipeline stages, TP + SP): each equals the CPU run of the same layout bit for bit (the emulator
// runs the CPU's kernels, and the staged calls are the CPU run's MPI calls on the same bytes) and
// one process within the distributed tests' tolerance, with zero races. Then the mutation tests:
// a wait or a recordStream left out (a test hook) is a race the checker reports, and the run fails.
#include "core/files/safetensors.h"
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;

namespace {

const std::string kEmulated =
    " --set hardware.device=emulated --set hardware.emulated_stream_check=true --set parallel.device_collectives=host";

struct DeviceLayout {
  std::string name;
  int ranks;
  std::string args;
};

// Each communication path the device runtime has, on two ranks.
const std::vector<DeviceLayout> kLayouts{
    {"ep2", 2, " --set parallel.expert_model_parallel_size=2"},
    {"dp2_zero1", 2, " --set parallel.use_distributed_optimizer=true --set parallel.ddp_bucket_size=5000"},
    {"pp2_vpp2", 2, kPipelineModel + " --set parallel.pipeline_model_parallel_size=2 "
                                     "--set parallel.virtual_pipeline_model_parallel_size=2"},
    {"tp2_sp", 2, " --set parallel.tensor_model_parallel_size=2 --set parallel.sequence_parallel=true"},
};

CommandResult train_layout(const std::string& config, const TempDir& dir, const std::string& name, int ranks,
                           const std::string& extra) {
  const std::string launcher = ranks == 1 ? kBin : kMpirun + fmt::format(" -np {} ", ranks) + kBin;
  return run_command(launcher + " train " + config +
                     " --set model.kernels=reference --set training.train_iters=3 --set training.eval_iters=0"
                     " --set parallel.overlap_comm=true" +
                     extra + " --set checkpoint.save=" + (dir.path() / name).string() +
                     " --set logging.run_dir=" + (dir.path() / name).string());
}

}  // namespace

TEST_CASE("multi-rank training on emulated devices with host-staged collectives equals the CPU layout bit for bit and "
          "one process, with zero stream-order races",
          "[device][train][mpi]") {
  TempDir dir;
  const auto config = write_config(dir);
  // One process, with the fixture's 2 layers and with the pipeline layout's 4.
  for (const auto& [name, model] : {std::pair{"single", std::string()}, std::pair{"single_pp", kPipelineModel}}) {
    REQUIRE(train_layout(config, dir, name, 1, model).exit_code == 0);
  }
  for (const auto& layout : kLayouts) {
    INFO(layout.name);
    const bool pipeline = layout.args.find(kPipelineModel) != std::string::npos;
    const auto cpu = train_layout(config, dir, layout.name + "_cpu", layout.ranks, layout.args);
    INFO(cpu.output);
    REQUIRE(cpu.exit_code == 0);
    const auto emulated = train_layout(config, dir, layout.name + "_emulated", layout.ranks, layout.args + kEmulated);
    INFO(emulated.output);
    REQUIRE(emulated.exit_code == 0);
    CHECK_THAT(emulated.output, Contains("stream-order checker: 0 race(s) on this rank"));
    CHECK_THAT(emulated.output, !Contains("stream-order race"));

    const auto s = read_metrics(dir.path() / (pipeline ? "single_pp" : "single") / "metrics.jsonl");
    const auto c = read_metrics(dir.path() / (layout.name + "_cpu") / "metrics.jsonl");
    const auto e = read_metrics(dir.path() / (layout.name + "_emulated") / "metrics.jsonl");
    REQUIRE(c.size() == 3);
    REQUIRE(e.size() == 3);
    for (size_t i = 0; i < 3; ++i) {
      INFO("iteration " << i + 1);
      for (const char* key : {"lm_loss", "aux_loss", "grad_norm", "expert_load_per_layer", "consumed_samples"}) {
        INFO(key);
        CHECK(e[i][key] == c[i][key]);
      }
      CHECK(relative(e[i]["lm_loss"].get<double>(), s[i]["lm_loss"].get<double>()) < 1e-5);
      CHECK(relative(e[i]["grad_norm"].get<double>(), s[i]["grad_norm"].get<double>()) < 1e-5);
      CHECK(e[i].value(metric::kPeakMemoryAllocated, int64_t{0}) > 0);
    }
    const SafetensorsCheckpoint on_cpu((dir.path() / (layout.name + "_cpu") / "iter_0000003").string());
    const SafetensorsCheckpoint on_device((dir.path() / (layout.name + "_emulated") / "iter_0000003").string());
    REQUIRE(on_cpu.names() == on_device.names());
    for (const auto& name : on_cpu.names()) {
      INFO(name);
      CHECK(torch::equal(on_cpu.tensor(name, torch::kFloat32), on_device.tensor(name, torch::kFloat32)));
    }
  }
}

TEST_CASE("mutation tests: a dropped stream wait or recordStream is a race the stream-order checker reports",
          "[device][train][mpi][errors]") {
  TempDir dir;
  const auto config = write_config(dir);
  struct Mutation {
    std::string name, env, layout;
  };
  // The expert all-to-all's wait, a gradient bucket's (ZeRO-1's reduce-scatter), a pipeline
  // receive's, and the all-to-all input's recordStream (freed by the compute stream while the
  // communication stream reads it).
  const std::vector<Mutation> mutations{
      {"all_to_all_wait", "MOEFORGE_TEST_DROP_STREAM_WAIT=all_to_all", kLayouts[0].args},
      {"bucket_wait", "MOEFORGE_TEST_DROP_STREAM_WAIT=reduce_scatter", kLayouts[1].args},
      {"pipeline_receive_wait", "MOEFORGE_TEST_DROP_STREAM_WAIT=exchange", kLayouts[2].args},
      {"all_to_all_record_stream", "MOEFORGE_TEST_DROP_RECORD_STREAM=all_to_all", kLayouts[0].args},
  };
  for (const auto& m : mutations) {
    INFO(m.name);
    // The hook is read from the environment the ranks inherit from mpirun.
    const auto r = run_command("env " + m.env + " " + kMpirun + " -np 2 " + kBin + " train " + config +
                               " --set model.kernels=reference --set training.train_iters=1 --set training.lr_warmup_iters=0"
                               " --set training.eval_iters=0"
                               " --set parallel.overlap_comm=true" + m.layout + kEmulated +
                               " --set logging.run_dir=" + (dir.path() / m.name).string());
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK_THAT(r.output, Contains("stream-order race"));
    CHECK_THAT(r.output, Contains("the emulated device's stream-order checker reported"));
  }
}
