#include "launch/train/trainer.h"

#include "core/base/errors.h"
#include "core/config/logging.h"
#include "core/device/device_memory.h"
#include "core/device/device_runtime.h"
#include "core/device/host_sync.h"
#include "core/files/durable_file.h"
#include "core/flops/model_size.h"
#include "core/kernels/kernels.h"
#include "core/kernels/self_check.h"
#include "core/kernels/wgrad_accumulation.h"
#include "data/dataset_identity.h"
#include "data/datasets.h"
#include "launch/train/micro_batches.h"
#include "launch/train/restore.h"
#include "launch/train/energy.h"
#include "launch/train/fingerprint.h"
#include "launch/train/run_environment.h"
#include "launch/train/save.h"
#include "launch/train/sharded_checkpoint.h"
#include "moe/model_loss.h"
#include "moe/moe_layer.h"
#include "moe/upcycle.h"
#include "parallel/comm/flight_recorder.h"
#include "parallel/comm/hang_analysis.h"
#include "parallel/data_parallel_optimizer.h"
#include "parallel/pipeline.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <numeric>

namespace fs = std::filesystem;

namespace moeforge {

namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kMaxLockRecord = 1024;  // bytes of a lock record (core/files/dir_lock.h) sent to the other ranks
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string human_count(int64_t n) {
  if (n >= 1'000'000'000) return fmt::format("{:.2f} B", static_cast<double>(n) / 1e9);
  if (n >= 1'000'000) return fmt::format("{:.2f} M", static_cast<double>(n) / 1e6);
  if (n >= 1'000) return fmt::format("{:.1f} K", static_cast<double>(n) / 1e3);
  return fmt::format("{}", n);
}

// training.deterministic: cuBLAS needs a fixed workspace for repeatable reductions (set before the
// first GEMM makes its handle), and LibTorch's deterministic algorithms replace the atomic ones
// (index_add_, scatter_add_, the attention backward where it has a deterministic variant); an op
// without a deterministic implementation warns, naming itself, instead of stopping the run.
void apply_determinism(bool on) {
  if (!on) return;
  setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
  spdlog::info("training.deterministic: deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG={})",
               std::getenv("CUBLAS_WORKSPACE_CONFIG"));
}

}  // namespace

Trainer::Trainer(LoadedConfig loaded, std::unique_ptr<MpiRuntime> mpi, const std::string& command, bool quiet,
                 std::unique_ptr<StartupWatch> startup)
    : loaded_(std::move(loaded)), c_(loaded_.config), mpi_(std::move(mpi)), startup_(std::move(startup)) {
  setup_parallel();
  claim_directories();
  setup_data();
  setup_model();
  setup_optimizer();
  restore();
  announce(command, quiet);
  exit_ = std::make_unique<ExitConditions>(c_.training);
  if (c_.training.exit_signal_handler && c_.training.exit_signal == "SIGTERM" && mpi_ && is_rank0() &&
      std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr) {
    spdlog::warn("training.exit_signal is SIGTERM under mpirun, which sends SIGKILL 1 s after forwarding SIGTERM: no save "
                 "finishes in time. Use training.exit_signal: SIGUSR1 (mpirun forwards it) and signal mpirun with it");
  }
}

void Trainer::setup_parallel() {
  const int64_t world = mpi_ ? mpi_->world_size() : 1;
  layout_ = ParallelLayout::create(c_, world);
  if (c_.hardware.num_threads > 0) torch::set_num_threads(static_cast<int>(c_.hardware.num_threads));
  apply_determinism(c_.training.deterministic);
  // LibTorch seeds its default generators nondeterministically; seeded from training.seed (as
  // Megatron's _set_random_seed does), two identical runs save identical RNG state (rng.cpu).
  torch::manual_seed(static_cast<uint64_t>(c_.training.seed));
  const int local_rank = mpi_ ? mpi_->local_rank() : 0;
  const int local_size = mpi_ ? mpi_->local_size() : 1;
  // Loads the device's backend library, if any, then takes this rank's device (core/device/device_runtime.h).
  // NCCL binds each communicator to the device current when it is made: chosen first.
  const c10::DeviceType type = training_device_type(c_.hardware, local_size);
  if (type != c10::DeviceType::CPU) device_ = select_device(type, local_rank, local_size);
  peaks_ = DevicePeaks(device_);
  check_gpu_build(c_, world);
  if (startup_) startup_->phase("creating the process groups");
  if (world > 1) {
    groups_ = ProcessGroups::create(
        layout_, std::shared_ptr<MpiCommunicator>(MpiCommunicator::world(c_.parallel.distributed_timeout_minutes * 60.0)),
        device_, device_collectives(c_));
  } else {
    groups_ = ProcessGroups::single();
  }
  startup_.reset();  // from here on every communication is watched (parallel.distributed_timeout_minutes)
  // Before anything is allocated: a plan larger than the memory it runs in is refused now, not
  // found out as an allocation failure (or a host swapping) minutes later.
  std::optional<int64_t> device_total;
  if (const auto memory = device_memory(device_)) device_total = memory->total_bytes;
  check_memory_fits(c_, layout_, device_total, mpi_ ? mpi_->local_size() : 1);
}

void Trainer::claim_directories() {
  // Where results go must be writable before any work is done, not found out at the first save;
  // and only this job writes there (a second run of the same config is refused, naming this one).
  const auto& run_dir = c_.logging.run_dir;
  const auto& save = c_.checkpoint.save;
  check_output_dir("logging.run_dir", run_dir, /*create=*/true);
  {
    // A communication timeout dumps every rank's flight recorder here (parallel/comm/flight_recorder.h);
    // this rank's dump (and rank 0's verdict) from an earlier run in the directory is not this run's.
    const fs::path hang = fs::path(run_dir) / kHangDir;
    std::error_code ec;
    const int rank = mpi_ ? mpi_->world_rank() : 0;
    fs::remove(hang / fmt::format("rank_{}.json", rank), ec);
    if (rank == 0) fs::remove(hang / kHangVerdictFile, ec);
    set_hang_dump_dir(hang);
  }
  std::vector<std::pair<const char*, std::string>> dirs{{"logging.run_dir", run_dir}};
  if (!save.empty()) {
    check_output_dir("checkpoint.save", save, /*create=*/true);
    std::error_code ec;
    if (!fs::equivalent(save, run_dir, ec)) dirs.emplace_back("checkpoint.save", save);
  }
  if (const auto& tb = c_.logging.tensorboard_dir; !tb.empty()) {
    check_tensorboard_build(tb);
    check_output_dir("logging.tensorboard_dir", tb, /*create=*/true);
    // Two runs writing one TensorBoard directory: TensorBoard dropped the first run's scalars.
    std::error_code ec;
    if (!fs::equivalent(tb, run_dir, ec) && (save.empty() || !fs::equivalent(tb, save, ec))) {
      dirs.emplace_back("logging.tensorboard_dir", tb);
    }
  }
  for (const auto& [key, dir] : dirs) {
    // Rank 0 takes the lock for the job; every other rank that sees the file checks it names rank 0.
    auto record = torch::zeros({kMaxLockRecord}, torch::kUInt8);  // host: MPI
    if (is_rank0()) {
      locks_.push_back(DirectoryLock::acquire(dir, key));
      remove_abandoned_temporaries(dir);  // a killed run's environment.json.tmp-<pid>, say
      const auto& text = locks_.back()->record();
      std::memcpy(record.data_ptr(), text.data(), std::min<size_t>(text.size(), kMaxLockRecord - 1));
    }
    if (groups_.world->size() == 1) continue;
    groups_.world->broadcast(record, 0);
    if (!is_rank0()) check_directory_lock(dir, reinterpret_cast<const char*>(record.data_ptr<uint8_t>()), key);
  }
}

void Trainer::setup_data() {
  check_data(c_);
  // Megatron's datasets for the splits the run reads: train, and valid when it evaluates.
  auto spec = data::dataset_spec_from_config(c_);
  spec.build = {true, c_.training.eval_iters > 0, false};
  const auto splits = data::build_datasets(spec);
  train_data_ = splits[0];
  valid_data_ = splits[1];
  // What every checkpoint records of the datasets, and a resume is checked against: hashed once,
  // here, by rank 0, which writes trainer_state.json in both checkpoint formats.
  if (is_rank0()) {
    auto datasets = data::identify_datasets(c_.data.data_path);
    if (!datasets.empty()) state_.datasets = std::move(datasets);
  }
  if (!valid_data_ && c_.training.eval_iters > 0) {
    spdlog::warn("data.split '{}' gives the valid split no documents: no evaluation (training.eval_iters {} ignored)",
                 c_.data.split, c_.training.eval_iters);
  }
}

void Trainer::setup_model() {
  kernels::set_choice(c_.model.kernels);
  start_ = start_point(c_.checkpoint);
  if (start_.checkpoint) check_checkpoint_fits(*start_.checkpoint, c_, layout_);
  if (start_.checkpoint && start_.checkpoint->resume && is_rank0()) {
    check_datasets_match(start_.checkpoint->dir, state_.datasets.value_or(std::vector<data::DatasetIdentity>{}),
                         c_.checkpoint.allow_dataset_change);
  }
  // Built on the meta device (no memory), then this rank keeps its stage and its experts and
  // allocates only those: no rank ever holds the whole model.
  model_ = moe::build_model(c_.model);
  model_->set_recompute(c_.training.recompute_granularity);
  shard_.emplace(parallelize_model(*model_, layout_, groups_, c_.parallel.overlap_comm));
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat32).device(device_);
  if (start_.checkpoint) {
    model::materialize(*model_, fp32);
    if (is_sharded_checkpoint(start_.checkpoint->dir) && is_rank0()) {
      if (const auto reshard = describe_reshard(start_.checkpoint->dir, layout_)) spdlog::info("{}", *reshard);
    }
    load_model_weights(start_.checkpoint->dir, *model_, *shard_);
  } else {
    init_shard(*model_, *shard_, fp32, static_cast<uint64_t>(c_.training.seed));
  }
  if (c_.training.bf16) model_->to(torch::kBFloat16);
  // Before the first step: the way this LibTorch adds a bf16 weight gradient into fp32 on this
  // device, then each fused kernel against its reference on it, the verdict
  // agreed over every rank (one failure anywhere: the reference everywhere).
  if (!device_.is_cpu()) {
    const auto refused = kernels::probe_mixed_accumulate(device_);
    if (!refused.empty()) spdlog::warn("fused weight gradient: {}", refused);
  }
  kernels::self_check(device_, [this](const std::vector<int64_t>& failed) {
    auto t = torch::tensor(failed, torch::kInt64);  // host: MPI verdicts
    groups_.world->all_reduce(t, ReduceOp::max);
    return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
  });
}

void Trainer::setup_optimizer() {
  const auto& t = c_.training;
  // The patterns are matched against the whole model's names; this rank trains those it holds.
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (auto& item : model_->named_parameters()) named.emplace_back(item.key(), item.value());
  auto trainable = select_trainable(named, t);
  for (const auto& p : trainable) {
    const auto& shape = shard_->partition.at(p.name).shape;
    for (const char* kind : {"exp_avg.", "exp_avg_sq.", "master."}) {
      if (kind[0] != 'm' || t.bf16) full_optimizer_shapes_[kind + p.name] = shape;
    }
  }
  trainable = shard_->trainable(std::move(trainable));
  if (is_rank0()) {
    std::vector<std::string> names;
    for (const auto& p : trainable) names.push_back(p.name);
    if (const auto why = moe::router_only_noop_reason(*model_, c_.model, names)) spdlog::warn("{}", *why);
  }
  optimizer_ = make_optimizer(std::move(trainable), t, groups_, c_.parallel);
  // Each chunk's parameters, armed for gradient reduction before that chunk's last backward.
  chunk_params_.assign(shard_->chunks.size(), {});
  for (size_t i = 0; i < optimizer_->params().size(); ++i) {
    const auto chunk = shard_->partition.at(optimizer_->params()[i].name).chunk;
    chunk_params_[static_cast<size_t>(chunk)].push_back(i);
  }
  schedule_ = std::make_unique<LrSchedule>(t);
}

void Trainer::restore() {
  const auto& t = c_.training;
  if (start_.checkpoint && start_.checkpoint->resume) {
    auto datasets = std::move(state_.datasets);  // this run's (setup_data), which its checkpoints record
    state_ = load_training_state(start_.checkpoint->dir, *optimizer_, t.bf16, *shard_);
    state_.datasets = std::move(datasets);
    schedule_->set_num_steps(state_.lr_num_steps);
    spdlog::info("resumed from {}{} at iteration {} ({} samples consumed)", start_.checkpoint->dir,
                 start_.from_save ? " (the latest in checkpoint.save)" : "", state_.iteration,
                 state_.consumed_train_samples);
  } else if (start_.checkpoint) {
    spdlog::info("initialized the model from {} (weights only: a fresh optimizer and schedule)", start_.checkpoint->dir);
  }
  train_loader_ = std::make_unique<data::DataLoader>(train_data_, t.micro_batch_size, shard_->at.dp, layout_.dp(),
                                                     state_.consumed_train_samples);
}

void Trainer::announce(const std::string& command, bool quiet) {
  const auto& t = c_.training;
  const auto flops = model_flops_per_step(c_.model, t.global_batch_size, t.seq_length);
  work_ = {static_cast<double>(t.global_batch_size * t.seq_length), static_cast<double>(flops.megatron),
           static_cast<double>(flops.six_n), resolve_peak(c_.hardware, t.bf16), static_cast<double>(layout_.world())};

  const auto counts = count_parameters(c_.model);
  if (!quiet) spdlog::info("{}", resolved_config_table(loaded_));  // a log level above info leaves it out too
  spdlog::info("layout: {}", layout_.describe());
  spdlog::info("model: {} parameters ({} activated), {} trainable on this rank in {} tensors; {} on {}; {}",
               human_count(counts.total), human_count(counts.activated),
               human_count(optimizer_->num_trainable_elements()), optimizer_->params().size(),
               t.bf16 ? "bf16 with fp32 master weights" : "fp32", device_.str(),
               c_.parallel.use_distributed_optimizer ? "distributed optimizer (Adam state sharded over DP)"
                                                     : "Adam state replicated");
  spdlog::info("kernels: {}", kernels::describe_kernels());
  if (c_.model.moe_router_force_load_balancing) {
    spdlog::warn("model.moe_router_force_load_balancing: every expert gets T*K/E slots whatever the router says "
                 "(a benchmark of the machine, not of the model): the losses of this run are not training results");
  }
  spdlog::info("data: train {} samples, valid {}", train_data_->size(),
               valid_data_ ? std::to_string(valid_data_->size()) + " samples" : std::string("none"));
  spdlog::info("FLOPs per step: {:.4g} (Megatron), {:.4g} (6N); peak {:.4g} TFLOP/s per device from {}", work_.flops,
               work_.flops_6n, work_.peak.tflops, work_.peak.source);

  const auto hostnames = gather_hostnames(*groups_.world);
  if (is_rank0()) {
    const auto config_file = write_resolved_config(c_, c_.logging.run_dir);
    auto environment = run_environment(c_, hostnames, command);
    add_build_fingerprint(environment, config_file);
    // Rank 0's device's energy counter, where it has one (the metrics are rank 0's).
    energy_.emplace(EnergyMeter::open(c_.hardware.device, device_.is_cuda() ? device_.index() : 0, default_powercap_root()));
    spdlog::info("energy per step: {}", energy_->available() ? energy_->source() : "not recorded (" + energy_->source() + ")");
    environment["energy_source"] = energy_->available() ? energy_->source() : std::string("not recorded: ") + energy_->source();
    const std::string device = environment["chip"].get<std::string>();
    if (!c_.hardware.chip.empty() && !chip_matches(c_.hardware.chip, device)) {
      spdlog::warn("hardware.chip is '{}' but this run's device is '{}': MFU uses a peak of {:.4g} TFLOP/s ({}){}. The "
                   "report names the device that ran; remove hardware.chip (a GPU is then detected, a CPU calibrated) or "
                   "set hardware.peak_tflops to this device's peak",
                   c_.hardware.chip, device, work_.peak.tflops, work_.peak.source,
                   work_.peak.kind == "chip table" ? ", the configured chip's, not this device's" : "");
    }
    write_file_durably(fs::path(c_.logging.run_dir) / files::kEnvironment, environment.dump(2) + "\n");
    metrics_.emplace(fs::path(c_.logging.run_dir) / files::kMetrics, state_.iteration);
    if (c_.model.is_moe() && c_.logging.expert_loads_interval > 0) {
      expert_loads_.emplace(fs::path(c_.logging.run_dir) / files::kExpertLoads, state_.iteration);
    }
    if (c_.model.is_moe()) {
      routing_health_.emplace(CollapseCriterion::of(c_));
      if (state_.iteration > 0) routing_health_->replay(metrics_->path());
    }
    if (!c_.logging.tensorboard_dir.empty()) {
      tensorboard_.emplace(c_.logging.tensorboard_dir, state_.iteration + 1);
      spdlog::info("TensorBoard: {}", tensorboard_->path());
    }
  }
  profiler_.emplace(c_.logging, is_rank0(), device_);
}

StepMetrics Trainer::train_step() {
  const auto& t = c_.training;
  if (energy_) energy_->lap();  // the counter's start of this step
  StepMeter meter(device_, work_, peaks_);
  StepTimer& timer = meter.timer();
  const int64_t micro_batches = layout_.micro_batches_per_step();
  const auto& chunks = shard_->chunks;
  StepMetrics m;
  m.num_micro_batches = micro_batches;
  m.lr = schedule_->current();
  MicroBatches batches(*train_loader_, BatchSlicing::of(layout_, shard_->at), device_, std::ssize(chunks), &timer);
  StepLosses losses(c_.model, chunks, device_);
  auto global_loads = GlobalExpertLoads::for_run(c_, layout_, chunks.size(), *groups_.dp);
  for (auto& d : shard_->dispatchers) {
    if (!d) continue;
    d->stats().reset();
    d->set_compute_clock(compute_clock_);
  }
  compute_clock_->begin_step();

  // Forward and backward of every micro-batch through every chunk of this rank, in the pipeline
  // schedule (one stage: plain gradient accumulation). Backward runs on (LM + aux + z) /
  // micro-batches; a chunk without the head adds its layers' auxiliary losses to the gradient
  // coming from the next one.
  StageCallbacks callbacks;
  callbacks.forward = [&](const PipelineSlot& slot, const torch::Tensor& input) {
    const auto k = static_cast<size_t>(slot.chunk);
    const Batch& b = batches.get(slot);
    const auto out = model_->forward_layers(chunks[k].begin == 0 ? b.tokens : input, b.position_ids, chunks[k].begin,
                                            chunks[k].end, model::HeadOutput::head_input);
    const auto global = global_loads ? global_loads->add(k, out) : std::nullopt;
    const auto loss = moe::model_loss(c_.model, out, b.labels, b.loss_mask, global ? &*global : nullptr, b.loss_tokens);
    losses.add(k, loss, out);
    batches.done(slot);
    StageOutput o{out.hidden_BSD, {}};
    if (loss.total.requires_grad()) o.loss = loss.total / static_cast<double>(micro_batches);
    return o;
  };
  callbacks.before_backward = [&](const PipelineSlot& slot) {
    if (slot.micro_batch == micro_batches - 1) optimizer_->begin_last_backward(chunk_params_[static_cast<size_t>(slot.chunk)]);
  };
  callbacks.after_backward = [&](const PipelineSlot&) { optimizer_->accumulate_grads(); };
  run_pipeline(*groups_.pp, std::ssize(chunks), micro_batches, false, stage_activation_shape(c_, layout_),
               activation_options(), callbacks, &timer);

  // Gradients over the data-parallel ranks; the step's losses and expert loads read in one go.
  timer.start(Phase::grad_reduce);
  optimizer_->reduce_grads();
  const ReducedLosses reduced = losses.reduce(groups_, layout_, micro_batches);
  timer.stop(Phase::grad_reduce);
  set_losses(m, reduced, c_.model);
  if (layout_.ep() > 1) record_dispatch(m);

  timer.start(Phase::optimizer);
  update(m, reduced);
  timer.stop(Phase::optimizer);
  ++state_.iteration;
  state_.consumed_train_samples += t.global_batch_size;
  state_.lr_num_steps = schedule_->num_steps();

  set_progress(m, state_, c_);
  meter.finish(m);
  if (energy_) {
    m.energy_per_step_j = energy_->lap();
    m.energy_source = energy_->source();
  }
  if (layout_.world() > 1) record_rank_times(m, m.time_forward_s + m.time_backward_s - m.time_all_to_all_s);
  return m;
}

void Trainer::update(StepMetrics& m, const ReducedLosses& reduced) {
  // The update, unless the step is not finite.
  const auto& t = c_.training;
  m.grad_norm = optimizer_->grad_norm();
  if (!std::isfinite(m.loss) || !std::isfinite(m.grad_norm)) {
    if (t.on_nonfinite == NonFinitePolicy::stop) {
      fail_user("iteration {}: the loss is {} and the gradient norm {}; stopping (training.on_nonfinite: stop). Lower "
                "training.lr, check the data, or set training.on_nonfinite: skip to skip such updates.",
                state_.iteration + 1, m.loss, m.grad_norm);
    }
    optimizer_->zero_grads();
    m.skipped = true;
    ++state_.skipped_iterations;
  } else {
    optimizer_->clip_grads(m.grad_norm, t.clip_grad);
    optimizer_->step(m.lr);
    schedule_->step();  // as Megatron: only a successful update advances the schedule
  }
  // Aux-loss-free balancing (as Megatron, also after a skipped update): every rank moves the biases
  // of its routers by the same global loads, so the biases stay identical everywhere.
  if (reduced.load_LE.defined()) {
    for (const auto& range : shard_->chunks) moe::update_expert_biases(*model_, range.begin, range.end, reduced.load_LE);
  }
}

void Trainer::record_rank_times(StepMetrics& m, double compute_s) {
  // Every rank's breakdown (rank 0 writes it): the slow stage or the overloaded EP rank shows.
  // A record of named values (docs/training.md): append new ones here.
  const std::vector<std::pair<const char*, double>> record{
      {"compute_s", compute_s},
      {"pipeline_wait_s", m.time_pipeline_wait_s},
      {"all_to_all_s", m.time_all_to_all_s},
      {"grad_reduce_s", m.time_grad_reduce_s},
      {"optimizer_s", m.time_optimizer_s},
      {"step_s", m.step_time_s},
      {"comm_s", m.time_comm_s},
      {"comm_exposed_s", m.time_comm_exposed_s},
      {"peak_memory_bytes", static_cast<double>(m.peak_memory_bytes)},
      {"peak_memory_reserved_bytes", static_cast<double>(m.device_memory ? m.device_memory->peak_reserved_bytes : 0)},
      // Expert parallel: the step's compute before each all-to-all (ComputeBeforeAllToAll), whose
      // spread over the EP ranks is the straggler's share of the step (docs/report.md).
      {"compute_before_all_to_all_s", layout_.ep() > 1 ? compute_clock_->seconds : 0.0}};
  std::vector<double> values;
  for (const auto& [key, value] : record) values.push_back(value);
  // host: timings
  const auto by_key = groups_.world->all_gather(torch::tensor(values, torch::kFloat64).unsqueeze(0)).t().contiguous();
  for (size_t k = 0; k < record.size(); ++k) {
    const double* p = by_key[static_cast<int64_t>(k)].data_ptr<double>();
    m.rank_times.emplace_back(record[k].first, std::vector<double>(p, p + by_key.size(1)));
  }
}

torch::TensorOptions Trainer::activation_options() const {
  return torch::TensorOptions().dtype(c_.training.bf16 ? torch::kBFloat16 : torch::kFloat32).device(device_);
}

void Trainer::record_dispatch(StepMetrics& m) {
  // Rows received per rank and MoE layer, gathered over DP: load imbalance across EP ranks is what
  // slows expert-parallel steps down, and what users look for. Other stages' layers are zeros
  // here: the sum over the pipeline fills every layer.
  const auto& dispatchers = shard_->dispatchers;
  auto received = torch::zeros({static_cast<int64_t>(dispatchers.size())}, torch::kInt64);  // host: host-side counts
  for (size_t l = 0; l < dispatchers.size(); ++l) {
    if (!dispatchers[l]) continue;
    const auto& s = dispatchers[l]->stats();
    received[static_cast<int64_t>(l)] = s.rows_received;
    m.all_to_all_bytes_sent += s.bytes_sent;
    m.time_all_to_all_s += s.seconds;
  }
  groups_.pp->all_reduce(received, ReduceOp::sum);
  const auto received_LR = groups_.dp->all_gather(received.unsqueeze(0)).t().contiguous();  // [layers, DP]
  for (int64_t l = 0; l < received_LR.size(0); ++l) {
    const auto row = received_LR[l];
    m.ep_tokens_received.emplace_back(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
    const double mean = row.to(torch::kFloat64).mean().item<double>();
    if (mean > 0) m.ep_tokens_received_max_over_mean = std::max(m.ep_tokens_received_max_over_mean, row.max().item<double>() / mean);
  }
}

double Trainer::evaluate() {
  // Megatron's validation iterator continues where the previous evaluation stopped.
  const auto& t = c_.training;
  const int64_t micro_batches = layout_.micro_batches_per_step();
  torch::NoGradGuard no_grad;
  data::DataLoader loader(valid_data_, t.micro_batch_size, shard_->at.dp, layout_.dp(), state_.consumed_valid_samples, 2);
  const auto& chunks = shard_->chunks;
  MicroBatches batches(loader, BatchSlicing::of(layout_, shard_->at), device_, std::ssize(chunks));
  StepLosses losses(device_);  // the LM loss, on the last stage
  StageCallbacks callbacks;
  callbacks.forward = [&](const PipelineSlot& slot, const torch::Tensor& input) {
    const auto k = static_cast<size_t>(slot.chunk);
    const Batch& b = batches.get(slot);
    const auto out = model_->forward_layers(chunks[k].begin == 0 ? b.tokens : input, b.position_ids, chunks[k].begin,
                                            chunks[k].end, model::HeadOutput::head_input);
    if (!out.hidden_BSD.defined()) losses.add_lm(model::lm_loss(out, b.labels, b.loss_mask, b.loss_tokens));
    batches.done(slot);
    return StageOutput{out.hidden_BSD, {}};
  };
  for (int64_t it = 0; it < t.eval_iters; ++it) {
    run_pipeline(*groups_.pp, std::ssize(chunks), micro_batches, true, stage_activation_shape(c_, layout_),
                 activation_options(), callbacks, nullptr);
    state_.consumed_valid_samples += t.global_batch_size;
  }
  return losses.reduce(groups_, layout_, t.eval_iters * micro_batches).lm;
}

void Trainer::save() {
  const auto t0 = Clock::now();
  peaks_.begin();  // the save's own window, from the optimizer state's gather over DP on
  CheckpointContents contents;
  contents.optimizer = optimizer_->state();  // collective: a sharded optimizer gathers over DP
  contents.optimizer_steps = optimizer_->steps();
  for (auto& [name, p] : shard_->parameters(*model_)) contents.model.emplace_back(name, p.detach());
  refuse_nonfinite(contents);
  std::string dir;
  {
    const ProgressTicker progress(fmt::format("saving the checkpoint of iteration {}", state_.iteration));
    dir = save_training_checkpoint(std::move(contents), state_, c_, *shard_, groups_, full_optimizer_shapes_);
  }
  save_peaks_ = peaks_.end();
  if (is_rank0()) {
    spdlog::info("saved checkpoint {} in {:.2f} s{}", dir, seconds_since(t0),
                 save_peaks_ ? fmt::format(" (device memory peak during the save: {:.2f} GiB allocated)",
                                           static_cast<double>(save_peaks_->peak_allocated_bytes) / (1LL << 30))
                             : "");
  }
}

void Trainer::refuse_nonfinite(const CheckpointContents& contents) {
  // A checkpoint holds finite numbers only: weights or optimizer state an update made non-finite
  // (an overflowing learning rate) are never written or tracked, so the newest checkpoint stays
  // one a resume can use. Each rank checks its own part; the verdict is the world's, so every rank
  // stops together.
  const auto bad = nonfinite_tensors(contents);
  if (!any_rank(!bad.empty())) return;
  const auto tracker = (fs::path(c_.checkpoint.save) / files::kTracker).string();
  const std::string where =
      bad.empty() ? "on another rank"
                  : fmt::format("{} tensor(s) on this rank: {}{}", bad.size(), fmt::join(bad.begin(), bad.begin() + std::min<size_t>(bad.size(), 3), ", "),
                                bad.size() > 3 ? ", ..." : "");
  fail_user("iteration {}: the weights or optimizer state hold NaN or infinity ({}), so no checkpoint was written and "
            "{} still names the last good one. An update overflowed: lower training.lr (or raise training.adam_eps) "
            "and resume from that checkpoint.",
            state_.iteration, where, tracker);
}

Trainer::StepAgreement Trainer::agree(const StepAgreement& mine) const {
  if (groups_.world->size() == 1) return mine;
  const std::vector<int64_t> flags{mine.metrics_lost, mine.stop.signal, mine.stop.duration};
  auto t = torch::tensor(flags, torch::kInt64);  // host: MPI
  groups_.world->all_reduce(t, ReduceOp::max);
  const auto* v = t.data_ptr<int64_t>();
  return {v[0] != 0, {v[1] != 0, v[2] != 0}};
}

bool Trainer::any_rank(bool flag) const {
  if (groups_.world->size() == 1) return flag;
  auto t = torch::full({1}, static_cast<int64_t>(flag), torch::kInt64);  // host: MPI
  groups_.world->all_reduce(t, ReduceOp::max);
  return t.item<int64_t>() != 0;
}

void Trainer::check_stream_order() const {
  // Reported as they happened (the emulator's stderr); the run ends with an error on every rank
  // when any rank had one, so a device-order bug cannot pass as a finished run.
  const int64_t races = stream_order_races();
  spdlog::info("stream-order checker: {} race(s) on this rank", races);
  if (any_rank(races > 0)) {
    fail_user("the emulated device's stream-order checker reported {} race(s) on this rank (and at least one rank had "
              "one; each is printed above as 'stream-order race'): a stream reads or frees device memory another "
              "stream writes or uses without an event wait or recordStream ordering them; fix the missing wait",
              races);
  }
}

void Trainer::stop_on_lost_metrics(const std::string& error) {
  // A run whose metrics cannot be written is not a benchmark anyone can read: it ends now, with
  // its progress saved when it saves checkpoints (that save may fail on the same full disk; the
  // previous checkpoint then stays the latest).
  if (!c_.checkpoint.save.empty()) {
    try {
      save();
    } catch (const UserError& e) {
      spdlog::error("the final checkpoint could not be saved either: {}", e.what());
    }
  }
  if (is_rank0()) throw UserError(error);
  throw UserError(fmt::format("rank 0 could not write {} (its message names the error)",
                              (fs::path(c_.logging.run_dir) / files::kMetrics).string()));
}

int Trainer::train() {
  const auto& t = c_.training;
  const auto start = Clock::now();
  const DeviceSyncCounter count_device_syncs(device_);  // host_syncs on devices: every sync they report
  if (state_.iteration >= t.train_iters) {
    spdlog::info("nothing to do: the checkpoint is at iteration {} and training.train_iters is {}", state_.iteration,
                 t.train_iters);
    return 0;
  }
  const int64_t first = state_.iteration + 1;
  bool signal_logged = false;
  while (state_.iteration < t.train_iters) {
    profiler_->before_step(state_.iteration + 1);
    StepMetrics m = train_step();
    m.save_device_memory = std::exchange(save_peaks_, std::nullopt);
    profiler_->after_step(state_.iteration);
    const bool last = state_.iteration == t.train_iters;
    const bool eval_now = valid_data_ && t.eval_iters > 0 && (state_.iteration % t.eval_interval == 0 || last);
    nlohmann::json extra;
    if (eval_now) {
      const auto t0 = Clock::now();
      m.valid_lm_loss = evaluate();
      extra[metric::kTimeEval] = seconds_since(t0);
    }
    const bool log_now = state_.iteration % c_.logging.log_interval == 0 || last;
    if (log_now) spdlog::info("{}", step_log_line(m));
    if (m.valid_lm_loss) {
      spdlog::info("validation at iteration {} | lm loss: {:.6E} | lm loss PPL: {:.6E}", m.iteration, *m.valid_lm_loss,
                   std::exp(std::min(*m.valid_lm_loss, 20.0)));
    }
    std::string metrics_error;  // rank 0's
    if (metrics_) {
      auto j = step_metrics_json(m);
      if (!extra.is_null()) j.update(extra);
      if (routing_health_) {
        if (const auto collapse = routing_health_->observe(m.iteration, layer_loads(j))) {
          spdlog::warn("{}", routing_collapse_message(*collapse, c_));
          j[metric::kRoutingCollapse] = routing_collapse_json(*collapse, c_.model);
        }
      }
      try {
        metrics_->append(j);
        const int64_t every = c_.logging.expert_loads_interval;
        if (expert_loads_ && !m.expert_tokens_per_layer.empty() && (m.iteration % every == 0 || last)) {
          expert_loads_->append(expert_loads_json(m));
        }
      } catch (const UserError& e) {
        metrics_error = e.what();
      }
      if (tensorboard_ && (log_now || eval_now)) tensorboard_->add_scalars(m.iteration, tensorboard_scalars(j));
    }
    const bool save_now = !c_.checkpoint.save.empty() &&
                          (last || (c_.checkpoint.save_interval && state_.iteration % *c_.checkpoint.save_interval == 0));
    const StopVotes vote = exit_->vote();
    if (vote.signal && !signal_logged) {
      spdlog::warn("{} received: every rank stops after this iteration, with a checkpoint",
                   t.exit_signal);
      signal_logged = true;
    }
    const StepAgreement agreed = agree({!metrics_error.empty(), vote});
    if (agreed.metrics_lost) stop_on_lost_metrics(metrics_error);
    const auto stop = last ? std::nullopt : exit_->reason(agreed.stop, state_.iteration);
    if (save_now || (stop && !c_.checkpoint.save.empty())) save();
    if (stop) {
      spdlog::info("stopping after iteration {}: {}; {}", state_.iteration, *stop,
                   c_.checkpoint.save.empty() ? "checkpoint.save is not set, so nothing was saved"
                                              : "the same command resumes from the checkpoint");
      break;
    }
  }
  if (c_.hardware.emulated_stream_check) check_stream_order();
  const double total = seconds_since(start);
  spdlog::info("trained iterations {}..{} in {:.1f} s; metrics: {}", first, state_.iteration, total,
               (fs::path(c_.logging.run_dir) / files::kMetrics).string());
  if (!c_.checkpoint.save.empty()) {
    spdlog::info("checkpoint: {}", (fs::path(c_.checkpoint.save) / files::iteration_dir(state_.iteration)).string());
  }
  return 0;
}

}  // namespace moeforge
