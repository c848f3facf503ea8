// defines: Trainer
//
// The training runtime: pretraining on one process, or pipeline-, data- and expert-parallel under
// mpirun (each DP rank reads its slice of every global batch; each pipeline stage runs its layers
// in Megatron's 1F1B schedule; each EP rank holds num_experts / EP experts and exchanges tokens by
// all-to-all; gradients are reduced by the data-parallel optimizer, optionally ZeRO-1; rank 0 logs,
// writes metrics and, for whole checkpoints, saves). Per iteration: global_batch / (micro_batch x
// DP) micro-batches (Megatron's sampler order), forward, backward of (LM + aux + z loss) /
// micro-batches, fp32 gradient accumulation, global-norm clipping, AdamW with Megatron's LR
// schedule, one log line with MFU and one metrics.jsonl object; evaluation every eval_interval
// iterations; atomic checkpoints every save_interval iterations and at the end; resume from the
// latest checkpoint of --load (or of checkpoint.save).
//
// The constructor is the start-up, in named steps (setup_parallel, setup_data, setup_model,
// setup_optimizer, restore, announce); train_step() is one iteration, read top to bottom.
#pragma once

#include "core/config/config_loader.h"
#include "core/files/dir_lock.h"
#include "core/model/gpt_model.h"
#include "core/optim/lr_schedule.h"
#include "core/flops/mfu.h"
#include "core/optim/optimizer.h"
#include "data/loader.h"
#include "launch/train/checkpoint.h"
#include "launch/train/energy.h"
#include "launch/train/exit_conditions.h"
#include "launch/train/metrics.h"
#include "launch/train/profiler.h"
#include "launch/train/routing_health.h"
#include "launch/train/sharded_checkpoint.h"
#include "launch/train/startup_checks.h"
#include "launch/train/tensorboard.h"
#include "parallel/layout/layout.h"
#include "parallel/comm/mpi_communicator.h"
#include "parallel/parallelize.h"
#include "parallel/comm/process_groups.h"
#include "parallel/comm/watchdog.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

class Trainer {
 public:
  // `mpi`: this process's MPI runtime when an MPI launcher started it (the world size and this
  // rank come from it), null on one process. `command`: the command line, for environment.json.
  // `quiet`: no resolved-config table at start-up (--quiet). `startup`: the watch armed before
  // MPI_Init, ended once the process groups exist.
  Trainer(LoadedConfig loaded, std::unique_ptr<MpiRuntime> mpi, const std::string& command = "", bool quiet = false,
          std::unique_ptr<StartupWatch> startup = nullptr);
  // Trains from the current state to training.train_iters; returns the process exit code.
  int train();

 private:
  // Start-up, in this order.
  void setup_parallel();   // the layout (every rule), the device, the process groups
  void claim_directories();  // run_dir and checkpoint.save: writable, and this job's alone (core/files/dir_lock.h)
  void setup_data();         // the datasets
  void setup_model();      // built on the meta device, parallelized, then this rank's part materialised
  void setup_optimizer();  // trainable parameters, the optimizer and the LR schedule
  void restore();          // a training checkpoint's optimizer, schedule, counters and RNG; the loader
  void announce(const std::string& command, bool quiet);  // resolved config, layout, model; run files

  StepMetrics train_step();
  // The optimizer's step from the reduced gradients (skipped, or the run stopped, when the loss or
  // the gradient norm is not finite), then aux-loss-free balancing's bias update.
  void update(StepMetrics& m, const ReducedLosses& reduced);
  void record_dispatch(StepMetrics& m);
  void record_rank_times(StepMetrics& m, double compute_s);
  torch::TensorOptions activation_options() const;
  double evaluate();
  void save();
  bool any_rank(bool flag) const;  // collective over the world
  // What any rank must make every rank do after a step, agreed in one all-reduce over the world.
  struct StepAgreement {
    bool metrics_lost = false;  // rank 0 could not append to metrics.jsonl
    StopVotes stop;             // an early exit (exit_conditions.h)
  };
  StepAgreement agree(const StepAgreement& mine) const;
  // With hardware.emulated_stream_check: throws UserError on every rank when any rank's checker
  // reported a race (collective over the world).
  void check_stream_order() const;
  // Rank 0 could not append to metrics.jsonl: a last checkpoint when the run saves, then a UserError.
  [[noreturn]] void stop_on_lost_metrics(const std::string& error);
  // Ends the run (every rank) if any rank's part of `contents` is not finite; collective.
  void refuse_nonfinite(const CheckpointContents& contents);

  bool is_rank0() const { return groups_.world->rank() == 0; }

  LoadedConfig loaded_;
  const ExperimentConfig& c_;
  std::unique_ptr<MpiRuntime> mpi_;  // outlives groups_ (declared first, destroyed last)
  std::unique_ptr<StartupWatch> startup_;
  std::vector<std::unique_ptr<DirectoryLock>> locks_;  // rank 0's; released after every write
  ParallelLayout layout_;
  ProcessGroups groups_;
  torch::Device device_{torch::kCPU};
  DevicePeaks peaks_{torch::kCPU};  // device_'s allocator peaks: since start, per step, per save
  std::optional<DeviceMemory> save_peaks_;  // the last save's, for the next step's metrics
  std::shared_ptr<const data::SampleSource> train_data_, valid_data_;
  StartPoint start_;
  model::GPTModel model_{nullptr};
  std::optional<ModelShard> shard_;  // this rank's stage and experts
  std::vector<std::vector<size_t>> chunk_params_;  // per model chunk: its parameters' indices in the optimizer
  TensorShapes full_optimizer_shapes_;  // every optimizer tensor whole (a sharded checkpoint's shards.json)
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<LrSchedule> schedule_;
  std::unique_ptr<data::DataLoader> train_loader_;
  TrainState state_;
  StepWork work_;  // what each step's throughput is measured against
  std::optional<MetricsFile> metrics_;  // rank 0
  std::optional<EnergyMeter> energy_;   // rank 0: its device's energy counter, if any
  std::optional<MetricsFile> expert_loads_;  // rank 0, MoE models with logging.expert_loads_interval > 0
  // Every dispatcher's shared clock of the compute before each all-to-all (rank_times).
  std::shared_ptr<ComputeBeforeAllToAll> compute_clock_ = std::make_shared<ComputeBeforeAllToAll>();
  std::optional<TensorBoardWriter> tensorboard_;  // rank 0, with logging.tensorboard_dir
  std::optional<RoutingHealth> routing_health_;    // rank 0, MoE models
  std::optional<StepProfiler> profiler_;
  std::unique_ptr<ExitConditions> exit_;  // its signal handler lives as long as the trainer
};

}  // namespace moeforge
