// `moeforge train CONFIG --dry-run`: everything a run decides before it allocates the model, so a
// layout mistake shows up on a login node instead of after a queue wait.
#include "launch/commands/commands.h"

#include "core/base/errors.h"
#include "core/device/device_runtime.h"
#include "data/dataset_identity.h"
#include "data/datasets.h"
#include "launch/train/sharded_checkpoint.h"
#include "core/files/dir_lock.h"
#include "launch/train/startup_checks.h"
#include "launch/train/tensorboard.h"
#include "parallel/layout/layout.h"
#include "parallel/layout/plan.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <iostream>
#include <sstream>

namespace fs = std::filesystem;

namespace moeforge {

namespace {

std::string gib(int64_t bytes) { return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1LL << 30)); }

// The run's device, without loading a backend library: a login node need have neither the GPU nor
// the vendor's runtime. A missing GPU is noted; a library that is not there is a problem.
std::string describe_device(const HardwareConfig& h, int64_t world) {
  if (h.device == "cpu") return "cpu";
  if (h.device == "cuda") {
    return fmt::format("cuda: {} GPU(s) visible on this machine, {} ranks need one each",
                       torch::cuda::is_available() ? torch::cuda::device_count() : 0, world);
  }
  const std::string library = device_library_path(h);
  if (!library.empty()) check_device_library_exists(library);
  if (h.device == "emulated") {
    return fmt::format("emulated: {} per node, {:g} GiB each, from {} (not loaded by the dry run)",
                       h.emulated_devices_per_node ? fmt::format("{} device(s)", *h.emulated_devices_per_node)
                                                   : std::string("one device per local rank"),
                       h.emulated_memory_gib, library);
  }
  return fmt::format("{}: {} (not loaded by the dry run)", h.device,
                     library.empty() ? "a device type LibTorch must know" : "from " + library);
}

// One line per rank: its coordinates, layers, experts, parameters, memory and checkpoint shard.
std::string rank_table(const Plan& plan, const ParallelLayout& layout, const ExperimentConfig& c) {
  std::ostringstream o;
  const auto row = [&](const auto&... cells) {
    o << fmt::format("  {:>5}  {:>5}  {:>3}  {:>3}  {:>3}  {:>3}  {:>8}  {:>11}  {:>14}  {:>10}  {}\n", cells...);
  };
  o << fmt::format("\nranks ({})\n", layout.describe());
  row("rank", "stage", "tp", "dp", "ep", "edp", "layers", "experts", "params", "peak", "checkpoint shard it writes");
  const int64_t experts = c.model.num_experts.value_or(0), per_rank = plan.experts_per_ep_rank;
  for (int64_t r = 0; r < layout.world(); ++r) {
    const RankCoordinates x = layout.coordinates(r);
    const StagePlan& s = plan.stages[static_cast<size_t>(x.pp)];
    std::string held = experts ? fmt::format("{}-{} of {}", x.ep * per_rank, (x.ep + 1) * per_rank - 1, experts) : "-";
    std::string shard = "-";
    if (c.checkpoint.format == CheckpointFormat::sharded && x.edp == 0) {
      shard = files::shard_dir(x.pp, x.ep);
    } else if (c.checkpoint.format == CheckpointFormat::whole && r == 0) {
      shard = "the whole checkpoint (gathered)";
    }
    row(r, x.pp, x.tp, x.dp, x.ep, x.edp, format_layer_ranges(s.chunks), held,
        fmt::format("{}", s.parameters), gib(s.peak_bytes), shard);
  }
  return o.str();
}

}  // namespace

int run_train_dry_run(const LoadedConfig& loaded, std::optional<int64_t> world_size, bool quiet) {
  const ExperimentConfig& c = loaded.config;
  std::string world_source;
  const int64_t world = planned_world_size(world_size, c, &world_source);
  const ParallelLayout layout = ParallelLayout::create(c, world);  // throws with every layout problem
  const Plan plan = make_plan(c, loaded.path, layout);

  // The trainer's start-up checks (launch/train/startup_checks.h), all of them, each reported.
  std::vector<std::string> ok, problems;
  const auto check = [&](const std::string& what, const std::function<std::string()>& f) {
    try {
      ok.push_back(fmt::format("{}: {}", what, f()));
    } catch (const UserError& e) {
      problems.push_back(fmt::format("{}: {}", what, e.what()));
    }
  };
  check("data", [&] {
    const std::string found = check_data(c);
    data::dataset_spec_from_config(c);  // the trainer's next step: loads the tokenizer when EOD masking needs it
    return found;
  });
  check("logging.run_dir", [&] {
    check_output_dir("logging.run_dir", c.logging.run_dir, /*create=*/false);
    check_directory_free(c.logging.run_dir, "logging.run_dir");
    return c.logging.run_dir + (fs::exists(c.logging.run_dir) ? "" : " (created at start-up)");
  });
  check("checkpoint.save", [&]() -> std::string {
    if (c.checkpoint.save.empty()) return "none (no checkpoints are saved)";
    check_output_dir("checkpoint.save", c.checkpoint.save, /*create=*/false);
    check_directory_free(c.checkpoint.save, "checkpoint.save");
    return c.checkpoint.save + (fs::exists(c.checkpoint.save) ? "" : " (created at the first save)");
  });
  check("logging.tensorboard_dir", [&]() -> std::string {
    const auto& tb = c.logging.tensorboard_dir;
    if (tb.empty()) return "none (no TensorBoard events are written)";
    check_tensorboard_build(tb);
    check_output_dir("logging.tensorboard_dir", tb, /*create=*/false);
    check_directory_free(tb, "logging.tensorboard_dir");
    return tb + (fs::exists(tb) ? "" : " (created at start-up)");
  });
  check("checkpoint.load", [&]() -> std::string {
    const StartPoint start = start_point(c.checkpoint);
    if (!start.checkpoint) return "a fresh model (Megatron's initialization)";
    check_checkpoint_fits(*start.checkpoint, c, layout);
    if (start.checkpoint->resume) {
      check_datasets_match(start.checkpoint->dir, data::identify_datasets(c.data.data_path), c.checkpoint.allow_dataset_change);
    }
    const std::string from = start.from_save ? " (the latest in checkpoint.save)" : "";
    if (!start.checkpoint->resume) return start.checkpoint->dir + ": Hugging Face weights, loadable on any layout";
    if (!is_sharded_checkpoint(start.checkpoint->dir)) {
      return start.checkpoint->dir + from + ": whole training checkpoint, resumable on any layout";
    }
    const auto reshard = describe_reshard(start.checkpoint->dir, layout);
    return start.checkpoint->dir + from + (reshard ? ": sharded as another layout, " + *reshard : ": sharded as this layout, resumable");
  });
  check("training.trainable / frozen", [&] {
    check_trainable(c);
    return std::string("every pattern matches");
  });
  check("hardware.device", [&]() -> std::string {
    check_gpu_build(c, world);
    return describe_device(c.hardware, world);
  });
  std::cout << config_table_unless_quiet(loaded, quiet)
            << fmt::format("dry run for world size {} (from {}): nothing is allocated or written except a token-id scan's "
                          "cache\n\n",
                          world, world_source)
            << format_plan(plan, c) << rank_table(plan, layout, c) << "\nchecks\n";
  for (const auto& line : ok) std::cout << "  ok       " << line << "\n";
  for (const auto& line : problems) std::cout << "  PROBLEM  " << line << "\n";
  std::cout << (problems.empty() ? "\ndry run passed: the run would start\n"
                                 : fmt::format("\ndry run found {} problem(s): fix them before launching\n", problems.size()));
  return problems.empty() ? 0 : 1;
}

}  // namespace moeforge
