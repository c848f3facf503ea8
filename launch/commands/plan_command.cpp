#include "launch/commands/commands.h"

#include "core/base/checked_int.h"
#include "core/config/config_loader.h"
#include "core/files/dir_lock.h"
#include "core/files/durable_file.h"
#include "core/base/errors.h"
#include "core/files/file_names.h"
#include "core/config/logging.h"
#include "data/blend.h"
#include "parallel/layout/plan.h"
#include "parallel/layout/layout.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

namespace moeforge {

int64_t planned_world_size(std::optional<int64_t> flag, const ExperimentConfig& c, std::string* source) {
  std::string ignored;
  std::string& from = source ? *source : ignored;
  if (flag) {
    from = "--world-size";
    return *flag;
  }
  if (c.parallel.world_size) {
    from = "parallel.world_size";
    return *c.parallel.world_size;
  }
  from = "the smallest layout, PP x EP";
  return checked_product(c.parallel.pipeline_model_parallel_size, c.parallel.expert_model_parallel_size);
}

int run_plan(const PlanOptions& options) {
  // --world-size is parallel.world_size for this plan, so the layout checks it as a run's.
  auto overrides = options.overrides;
  if (options.world_size) overrides.push_back(fmt::format("parallel.world_size={}", *options.world_size));
  const LoadedConfig loaded = load_config(options.config_path, overrides);
  const ExperimentConfig& c = loaded.config;
  set_log_level(c.logging.log_level);
  data::validate_data_config(c.data);
  std::string world_source;
  const int64_t world = planned_world_size(options.world_size, c, &world_source);
  spdlog::info("planning for world size {} (from {})", world, world_source);
  const ParallelLayout layout = ParallelLayout::create(c, world);
  const Plan plan = make_plan(c, options.config_path, layout);
  if (options.save) {
    // Not into the directory of a run in progress (its config.yaml is that run's record).
    const auto lock = DirectoryLock::acquire(c.logging.run_dir, "logging.run_dir");
    const auto config_file = write_resolved_config(c, c.logging.run_dir);
    const auto plan_file = std::filesystem::path(c.logging.run_dir) / files::kPlan;
    write_file_durably(plan_file, plan_to_json(plan, c).dump(2) + "\n");
    spdlog::info("wrote {} and {}", config_file.string(), plan_file.string());
  }
  if (options.json) {
    std::cout << plan_to_json(plan, c).dump(2) << "\n";
  } else {
    std::cout << config_table_unless_quiet(loaded, options.quiet) << format_plan(plan, c);
  }
  return 0;
}

}  // namespace moeforge
