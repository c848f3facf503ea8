// `moeforge train --dry-run` refuses every config the trainer refuses at start-up, with the same
// message (both call launch/train/startup_checks.h and ParallelLayout::create).
#include "core/config/config_loader.h"
#include "launch/train/startup_checks.h"
#include "parallel/layout/layout.h"
#include "parallel/layout/plan.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>

#include <regex>
#include <sstream>
#include <string>
#include <vector>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

// The lines of the trainer's error message ("error: [rank N: ]MESSAGE", up to the next log line,
// error or mpirun banner).
std::vector<std::string> trainer_error(const CommandResult& r) {
  static const std::regex error(R"(error: (rank \d+: )?)");
  std::smatch m;
  if (!std::regex_search(r.output, m, error)) return {};
  std::istringstream rest(m.suffix().str());
  std::vector<std::string> lines;
  for (std::string line; std::getline(rest, line);) {
    if (!lines.empty() && (line.starts_with("[") || line.starts_with("---") || line.starts_with("error:"))) break;
    if (!line.empty()) lines.push_back(line);
  }
  return lines;
}

// Runs the trainer (under mpirun when `ranks` > 1) and the dry run for the same world on the same
// config; both must refuse, the dry run with the trainer's message.
// With `plan`, `moeforge plan` (which sizes layouts) must refuse it the same way too.
void same_refusal(const std::string& config, const std::string& args, int ranks = 1, bool plan = false) {
  const std::string train = (ranks > 1 ? fmt::format("{} -np {} ", kMpirun, ranks) : std::string()) + kBin + " train " +
                            config + args;
  const auto trainer = run_command(train);
  INFO("trainer: " << trainer.output);
  REQUIRE(trainer.exit_code == 1);
  const auto message = trainer_error(trainer);
  REQUIRE_FALSE(message.empty());
  const auto dry = run_command(kBin + " train " + config + args + fmt::format(" --dry-run --world-size {}", ranks));
  INFO("dry run: " << dry.output);
  CHECK(dry.exit_code == 1);
  for (const auto& line : message) CHECK_THAT(dry.output, Contains(line));
  if (!plan) return;
  const auto planned = run_command(kBin + " plan " + config + args + fmt::format(" --world-size {}", ranks));
  INFO("plan: " << planned.output);
  CHECK(planned.exit_code == 1);
  for (const auto& line : message) CHECK_THAT(planned.output, Contains(line));
}

}  // namespace

TEST_CASE("the dry run refuses what the trainer refuses, with the same message", "[train][cli][errors]") {
  TempDir dir;
  const auto config = write_config(dir) + " --set training.train_iters=1 --set training.lr_warmup_iters=0";
  SECTION("tied embeddings under pipeline parallelism (a layout rule)") {
    same_refusal(config, kPipelineModel + " --set parallel.pipeline_model_parallel_size=2 "
                                          "--set model.untie_embeddings_and_output_weights=false", 2, /*plan=*/true);
  }
  SECTION("the pooled Hugging Face aux loss under pipeline parallelism (a layout rule)") {
    same_refusal(config, " --set model.num_layers=4 --set parallel.pipeline_model_parallel_size=2", 2, /*plan=*/true);
  }
  SECTION("experts that do not divide over EP (a layout rule)") {
    same_refusal(config, " --set parallel.expert_model_parallel_size=3 --set training.global_batch_size=12", 3,
                 /*plan=*/true);
  }
  SECTION("a split that leaves the train split no documents") {
    same_refusal(config, " --set data.split=0,1,0");
  }
  SECTION("a missing dataset") {
    same_refusal(config, " --set data.data_path=[" + (dir.path() / "nodata").string() + "]");
  }
  SECTION("an output directory that cannot be created") {
    const auto file = dir.file("a-file", "x");
    same_refusal(config, " --set logging.run_dir=" + file + "/run");
    same_refusal(config, " --set checkpoint.save=" + file + "/ckpt");
  }
  SECTION("a checkpoint to load that does not exist") {
    same_refusal(config, " --load " + (dir.path() / "nowhere").string());
  }
  SECTION("a freezing pattern that matches no parameter") {
    same_refusal(config, " --set 'training.trainable=[\"*.nothing_by_this_name\"]'");
  }
  SECTION("a checkpoint of another model or precision") {
    const std::string ckpt = (dir.path() / "ckpt").string();
    train(config, " --set checkpoint.save=" + ckpt + " --set logging.run_dir=" + (dir.path() / "first").string());
    same_refusal(config, " --load " + ckpt + " --set model.rotary_base=20000");
    same_refusal(config, " --load " + ckpt + " --set training.bf16=true");
  }
}

TEST_CASE("the dry run notes a missing GPU instead of refusing (a login node has none)", "[train][cli]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto dry = run_command(kBin + " train " + config + " --set hardware.device=cuda --dry-run");
  INFO(dry.output);
  CHECK(dry.exit_code == 0);
  CHECK_THAT(dry.output, Contains("ok       hardware.device: cuda: 0 GPU(s) visible"));
  const auto trainer = run_command(kBin + " train " + config + " --set hardware.device=cuda");
  CHECK(trainer.exit_code == 1);
  CHECK_THAT(trainer.output, Contains("no cuda device is visible"));
}

TEST_CASE("a device's memory check leaves headroom for the runtime: a plan filling the device is refused",
          "[train][errors][device]") {
  TempDir dir;
  const auto loaded = load_config(write_config(dir));
  const auto layout = ParallelLayout::create(loaded.config, 1);
  const Plan plan = make_plan(loaded.config, "", layout);
  const int64_t need = plan.stages.front().peak_bytes;
  // A device exactly as large as the plan: nothing left for the CUDA context, the library
  // workspaces or the allocator's fragmentation.
  const auto why = user_error([&] { check_memory_fits(loaded.config, layout, need, 1); });
  CHECK_THAT(why, Contains("the memory plan needs") && Contains("for tensors") && Contains("CUDA context"));
  const int64_t gib = int64_t{1} << 30;
  CHECK(usable_device_bytes(80 * gib) == 80 * gib - 4 * gib - 3 * gib / 2);  // 5 % and 1.5 GiB
  CHECK(usable_device_bytes(gib) == 0);
  check_memory_fits(loaded.config, layout, need + 4 * gib, 1);  // fits with room to spare
}
