// defines: TrainOptions, run_train, Trainer
//
// `moeforge train CONFIG [--set k=v ...] [--load DIR]`: pretraining on one process, or data and
// expert parallel under mpirun (each DP rank reads its slice of every global batch; each EP rank
// holds num_experts / EP experts and exchanges tokens by all-to-all; gradients reduced by the
// data-parallel optimizer, optionally ZeRO-1; rank 0 logs, writes metrics and saves). Per
// iteration: global_batch / micro_batch micro-batches (Megatron's sampler order), forward,
// backward of (LM + aux + z loss) / micro-batches, fp32 gradient accumulation, global-norm
// clipping, AdamW with Megatron's LR schedule, one log line with MFU and one metrics.jsonl
// object; evaluation every eval_interval iterations; atomic checkpoints every save_interval
// iterations and at the end; resume from the latest checkpoint of --load (or of checkpoint.save).
#pragma once

#include "core/config_loader.h"
#include "core/gpt_model.h"
#include "core/lr_schedule.h"
#include "core/mfu.h"
#include "core/optimizer.h"
#include "data/loader.h"
#include "launch/sharded_checkpoint.h"
#include "launch/train_checkpoint.h"
#include "launch/train_metrics.h"
#include "moe/alltoall_dispatcher.h"
#include "parallel/layout.h"
#include "parallel/process_groups.h"

#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

struct TrainOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string load;  // overrides checkpoint.load
  bool dry_run = false;                // layout, plan and checks only (run_train_dry_run)
  std::optional<int64_t> world_size;   // --world-size: the world a dry run plans for
  std::string command;                 // the command line, for environment.json
};
int run_train(const TrainOptions& options);

class Trainer {
 public:
  // `command`: the command line that started the run (recorded in environment.json).
  explicit Trainer(LoadedConfig loaded, const std::string& command = "");
  // Trains from the current state to training.train_iters; returns the process exit code.
  int train();

 private:
  struct Batch {
    torch::Tensor tokens, labels, loss_mask, position_ids;
  };
  void open_metrics();
  Batch to_tensors(const data::MicroBatch& mb) const;
  StepMetrics train_step();
  void record_dispatch(StepMetrics& m);
  bool on_stage(const std::string& parameter_name) const;  // held by this pipeline stage
  std::vector<int64_t> activation_shape() const;          // what stages send each other
  torch::TensorOptions activation_options() const;
  double evaluate();
  void save();
  void load_shard_weights(const std::string& dir, const RankCoordinates& coords);

  bool is_rank0() const { return groups_.world->rank() == 0; }

  LoadedConfig loaded_;
  const ExperimentConfig& c_;
  std::unique_ptr<MpiRuntime> mpi_;  // under a launcher with more than one rank; outlives groups_
  ProcessGroups groups_;
  int64_t dp_rank_ = 0, dp_size_ = 1, ep_rank_ = 0, ep_size_ = 1, world_ = 1;
  int64_t stage_ = 0, stage_begin_ = 0, stage_end_ = 0;  // this pipeline stage and its layers
  ShardLayout shard_layout_;
  TensorShapes full_model_shapes_, full_optimizer_shapes_;  // every tensor whole (shards.json)
  std::vector<int64_t> moe_index_;            // per layer: its index among MoE layers, or -1
  int64_t num_moe_layers_ = 0;
  torch::Device device_{torch::kCPU};
  model::GPTModel model_{nullptr};
  std::vector<std::shared_ptr<moe::AllToAllDispatcher>> dispatchers_;  // expert parallel only
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<LrSchedule> schedule_;
  std::shared_ptr<const data::SampleSource> train_data_, valid_data_;
  std::unique_ptr<data::DataLoader> train_loader_;
  TrainState state_;
  PeakFlops peak_;
  double flops_per_step_ = 0, flops_6n_per_step_ = 0;
  int64_t micro_batches_ = 1;
  std::ofstream metrics_;
};

}  // namespace moeforge
