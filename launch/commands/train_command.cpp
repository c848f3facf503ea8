// `[mpirun -np N] moeforge train CONFIG [--set k=v ...] [--load DIR] [--dry-run [--world-size N]]`.
#include "launch/commands/commands.h"

#include "core/config/config_loader.h"
#include "core/base/errors.h"
#include "core/config/logging.h"
#include "launch/train/trainer.h"
#include "parallel/comm/mpi_communicator.h"
#include "parallel/comm/watchdog.h"

#include <fmt/format.h>

#include <cstdio>

namespace moeforge {

int run_train(const TrainOptions& o) {
  auto overrides = o.overrides;
  if (!o.load.empty()) overrides.push_back("checkpoint.load=" + o.load);
  if (o.dry_run) {
    if (o.world_size) overrides.push_back(fmt::format("parallel.world_size={}", *o.world_size));
    LoadedConfig loaded = load_config(o.config_path, overrides);
    set_log_level(loaded.config.logging.log_level);
    return run_train_dry_run(loaded, o.world_size, o.quiet);
  }
  // Under an MPI launcher every process joins the MPI world first: the world size and this rank
  // are MPI's, and every log line carries the rank. Until the process groups exist nothing else
  // bounds the wait for a rank that never joins.
  // The watchdog ends a job that hangs or lost a peer: all of it at once, as this command would.
  set_job_abort([](int exit_code) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) MPI_Abort(MPI_COMM_WORLD, exit_code);
  });
  auto startup = MpiRuntime::launched() ? std::make_unique<StartupWatch>() : nullptr;
  std::unique_ptr<MpiRuntime> mpi = startup ? std::make_unique<MpiRuntime>() : nullptr;
  if (mpi) init_logging(mpi->world_rank(), LogLevel::info);
  if (startup) startup->phase("reading the config");
  const int rank = mpi ? mpi->world_rank() : 0, world = mpi ? mpi->world_size() : 1;
  try {
    LoadedConfig loaded = load_config(o.config_path, overrides);
    set_log_level(loaded.config.logging.log_level);
    Trainer trainer(std::move(loaded), std::move(mpi), o.command, o.quiet, std::move(startup));
    return trainer.train();
  } catch (const std::exception& e) {
    // An error on some ranks of a running job would leave the others waiting in a collective until
    // the timeout: end the whole job now.
    if (world > 1) {
      std::fprintf(stderr, "error: rank %d: %s\n", rank, e.what());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, dynamic_cast<const UserError*>(&e) ? 1 : 3);
    }
    throw;
  }
}

}  // namespace moeforge
