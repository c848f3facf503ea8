// `moeforge train CONFIG --dry-run`: everything a run decides before it allocates the model, so a
// layout mistake shows up on a login node instead of after a queue wait.
#include "launch/commands.h"

#include "core/config_schema.h"
#include "core/errors.h"
#include "core/logging.h"
#include "data/blend.h"
#include "data/indexed_dataset.h"
#include "launch/plan.h"
#include "launch/sharded_checkpoint.h"
#include "launch/train_checkpoint.h"
#include "parallel/layout.h"

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

// One line per rank: its coordinates, layers, experts, parameters, memory and checkpoint shard.
std::string rank_table(const Plan& plan, const ParallelLayout& layout, const ExperimentConfig& c) {
  std::ostringstream o;
  const auto row = [&](const auto&... cells) {
    o << fmt::format("  {:>5}  {:>5}  {:>3}  {:>3}  {:>3}  {:>8}  {:>11}  {:>14}  {:>10}  {}\n", cells...);
  };
  o << fmt::format("\nranks ({})\n", layout.describe());
  row("rank", "stage", "dp", "ep", "edp", "layers", "experts", "params", "peak", "checkpoint shard it writes");
  const int64_t experts = c.model.num_experts.value_or(0), per_rank = plan.experts_per_ep_rank;
  for (int64_t r = 0; r < layout.world(); ++r) {
    const RankCoordinates x = layout.coordinates(r);
    const StagePlan& s = plan.stages[static_cast<size_t>(x.pp)];
    std::string held = experts ? fmt::format("{}-{} of {}", x.ep * per_rank, (x.ep + 1) * per_rank - 1, experts) : "-";
    std::string shard = "-";
    if (c.checkpoint.format == CheckpointFormat::sharded && x.edp == 0) {
      shard = shard_dir_name(x.pp, x.ep);
    } else if (c.checkpoint.format == CheckpointFormat::whole && r == 0) {
      shard = "the whole checkpoint (gathered)";
    }
    row(r, x.pp, x.dp, x.ep, x.edp, fmt::format("{}-{}", s.first_layer, s.first_layer + s.num_layers - 1), held,
        fmt::format("{}", s.parameters), gib(s.peak_bytes), shard);
  }
  return o.str();
}

}  // namespace

int run_train_dry_run(const LoadedConfig& loaded, std::optional<int64_t> world_size) {
  const ExperimentConfig& c = loaded.config;
  std::string world_source;
  const int64_t world = resolve_world_size(world_size, c.parallel.world_size, c.parallel.pipeline_model_parallel_size,
                                           c.parallel.expert_model_parallel_size, &world_source);
  const ParallelLayout layout = ParallelLayout::create(c, world);  // throws with every layout problem
  const Plan plan = make_plan(c, loaded.path, layout);
  // Under a launcher every process would print the same: only the first does.
  const bool print = launcher_rank() == 0;

  // The checks a run makes before training, all of them, each reported.
  std::vector<std::string> ok, problems;
  const auto check = [&](const std::string& what, const std::function<std::string()>& f) {
    try {
      ok.push_back(fmt::format("{}: {}", what, f()));
    } catch (const UserError& e) {
      problems.push_back(fmt::format("{}: {}", what, e.what()));
    }
  };
  check("data", [&] {
    data::validate_data_config(c.data);
    // Opening a dataset maps and validates its index (reads no tokens).
    int64_t documents = 0;
    const auto prefixes = data::parse_blend(c.data.data_path).prefixes;
    for (const auto& prefix : prefixes) documents += data::IndexedDataset(prefix).num_documents();
    return fmt::format("{} dataset(s), {} documents, indices valid", prefixes.size(), documents);
  });
  const ShardLayout run_layout{layout.pp(), layout.ep(), layout.layers_per_stage()};
  const auto check_checkpoint = [&](const char* key, const std::string& path) {
    check(key, [&]() -> std::string {
      if (path.empty()) return "none";
      if (!fs::exists(path)) {
        if (std::string(key) == "checkpoint.save") return path + " (created at the first save)";
        fail_user("{} does not exist", path);
      }
      const auto found = find_checkpoint(path);
      if (!found) return path + " holds no checkpoint yet";
      if (!found->resume) return found->dir + ": Hugging Face weights, loadable on any layout";
      if (!is_sharded_checkpoint(found->dir)) return found->dir + ": whole training checkpoint, resumable on any layout";
      check_shard_layout(found->dir, run_layout);
      return found->dir + ": sharded as this layout, resumable";
    });
  };
  check_checkpoint("checkpoint.load", c.checkpoint.load);
  check_checkpoint("checkpoint.save", c.checkpoint.save);
  if (c.hardware.device == Device::cuda) {
    // A login node usually has no GPU: say so, do not fail.
    ok.push_back(fmt::format("hardware.device cuda: {} GPU(s) visible on this machine, {} ranks need one each",
                             torch::cuda::is_available() ? torch::cuda::device_count() : 0, world));
  }
  if (print) {
    std::cout << resolved_config_table(loaded) << "\n"
              << fmt::format("dry run for world size {} (from {}): nothing is allocated or written\n\n", world,
                             world_source)
              << format_plan(plan, c) << rank_table(plan, layout, c) << "\nchecks\n";
    for (const auto& line : ok) std::cout << "  ok       " << line << "\n";
    for (const auto& line : problems) std::cout << "  PROBLEM  " << line << "\n";
    std::cout << (problems.empty() ? "\ndry run passed: the run would start\n"
                                   : fmt::format("\ndry run found {} problem(s): fix them before launching\n",
                                                 problems.size()));
  }
  return problems.empty() ? 0 : 1;
}

}  // namespace moeforge
