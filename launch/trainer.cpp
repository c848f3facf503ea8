#include "launch/trainer.h"

#include "core/errors.h"
#include "core/logging.h"
#include "core/model_size.h"
#include "data/blend.h"
#include "data/datasets.h"
#include "launch/commands.h"
#include "launch/run_environment.h"
#include "launch/upcycle_command.h"
#include "moe/expert_parallel.h"
#include "moe/moe_layer.h"
#include "parallel/data_parallel_optimizer.h"
#include "parallel/pipeline.h"
#include "parallel/layout.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <filesystem>

namespace fs = std::filesystem;

namespace moeforge {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

std::string human_count(int64_t n) {
  if (n >= 1'000'000'000) return fmt::format("{:.2f} B", static_cast<double>(n) / 1e9);
  if (n >= 1'000'000) return fmt::format("{:.2f} M", static_cast<double>(n) / 1e6);
  if (n >= 1'000) return fmt::format("{:.1f} K", static_cast<double>(n) / 1e3);
  return fmt::format("{}", n);
}

void ensure_writable_dir(const char* key, const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || ::access(dir.c_str(), W_OK) != 0) {
    fail_user("{} {} cannot be created or written ({}). Choose a writable directory.", key, dir,
              ec ? ec.message() : std::string(std::strerror(errno)));
  }
}

// What the run starts from: --load / checkpoint.load, or, as Megatron, the latest checkpoint in
// checkpoint.save when it holds one (re-running a command after a crash resumes) unless --load
// names a training checkpoint explicitly; weights named by --load were that run's starting point.
std::optional<CheckpointToLoad> checkpoint_to_start_from(const CheckpointConfig& k, bool& from_save) {
  std::optional<CheckpointToLoad> checkpoint;
  if (!k.load.empty()) {
    checkpoint = find_checkpoint(k.load);
    if (!checkpoint) fail_user("{} holds no checkpoint yet. Remove checkpoint.load / --load to start fresh.", k.load);
  }
  from_save = !k.save.empty() && fs::exists(fs::path(k.save) / kTrackerFile) && !(checkpoint && checkpoint->resume);
  if (from_save) {
    if (checkpoint) {
      spdlog::info("checkpoint.save {} already holds a checkpoint: resuming it instead of starting again from {}", k.save,
                   checkpoint->dir);
    }
    checkpoint = find_checkpoint(k.save);
  }
  return checkpoint;
}

}  // namespace

Trainer::Trainer(LoadedConfig loaded, const std::string& command) : loaded_(std::move(loaded)), c_(loaded_.config) {
  const auto& t = c_.training;
  // This trainer runs on one process; the layout object still validates the config's degrees.
  std::string world_source;
  const int64_t world = resolve_world_size(std::nullopt, c_.parallel.world_size, c_.parallel.pipeline_model_parallel_size,
                                           c_.parallel.expert_model_parallel_size, &world_source);
  const ParallelLayout layout = ParallelLayout::create(c_, world);
  if (layout.pp() > 1 && !c_.model.untie_embeddings_and_output_weights) {
    fail_user("{}: pipeline parallel training needs untied embeddings (the embedding lives on the first stage, the "
              "head on the last), but model.untie_embeddings_and_output_weights is false. Set it to true or train "
              "with parallel.pipeline_model_parallel_size: 1.",
              loaded_.path);
  }
  if (layout.pp() > 1 && c_.model.moe_router_load_balancing_type == LoadBalancingType::hf_pooled_aux_loss) {
    fail_user("{}: model.moe_router_load_balancing_type hf_pooled_aux_loss pools the router statistics of all layers, "
              "which pipeline stages do not share; with parallel.pipeline_model_parallel_size {} use aux_loss or "
              "seq_aux_loss (per layer, as Megatron).",
              loaded_.path, layout.pp());
  }
  if (c_.hardware.num_threads > 0) torch::set_num_threads(static_cast<int>(c_.hardware.num_threads));
  const bool gpu = c_.hardware.device == Device::cuda;
  if (gpu && !torch::cuda::is_available()) {
    fail_user("hardware.device is cuda but no GPU is visible (CUDA build: {}). Use --set hardware.device=cpu.",
#ifdef MOEFORGE_WITH_CUDA
              "yes"
#else
              "no"
#endif
    );
  }
  if (layout.world() > 1) {
    mpi_ = std::make_unique<MpiRuntime>();
    // NCCL binds each communicator to the device current when it is made: choose it first.
    if (gpu) device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(select_cuda_device(mpi_->local_rank())));
    groups_ = ProcessGroups::create(
        layout, std::shared_ptr<MpiCommunicator>(MpiCommunicator::world(c_.parallel.distributed_timeout_minutes * 60.0)),
        /*nccl=*/gpu);
  } else {
    groups_ = ProcessGroups::single();
    if (gpu) device_ = torch::Device(torch::kCUDA, 0);
  }
  world_ = layout.world();
  dp_size_ = layout.dp();
  const RankCoordinates coords = layout.coordinates(groups_.world->rank());
  stage_begin_ = layout.first_layer(coords.pp);
  stage_end_ = stage_begin_ + layout.layers_per_stage()[static_cast<size_t>(coords.pp)];
  for (int64_t l = 0, n = 0; l < c_.model.num_layers; ++l) moe_index_.push_back(c_.model.is_moe_layer(l) ? n++ : -1);
  num_moe_layers_ = static_cast<int64_t>(std::count_if(moe_index_.begin(), moe_index_.end(), [](int64_t i) { return i >= 0; }));
  dp_rank_ = coords.dp;
  stage_ = coords.pp;
  ep_rank_ = coords.ep;
  ep_size_ = layout.ep();
  micro_batches_ = layout.micro_batches_per_step();

  // Data: Megatron's datasets for every split, read by the data-parallel sampler.
  data::validate_data_config(c_.data);
  const auto splits = data::build_datasets(data::dataset_spec_from_config(c_));
  train_data_ = splits[0];
  valid_data_ = splits[1];
  if (!train_data_) fail_user("data.split '{}' gives the train split no documents: training needs some", c_.data.split);
  if (!valid_data_ && t.eval_iters > 0) {
    spdlog::warn("data.split '{}' gives the valid split no documents: no evaluation (training.eval_iters {} ignored)",
                 c_.data.split, t.eval_iters);
  }
  // Where results go must be writable before any work is done, not found out at the first save.
  ensure_writable_dir("logging.run_dir", c_.logging.run_dir);
  if (!c_.checkpoint.save.empty()) ensure_writable_dir("checkpoint.save", c_.checkpoint.save);

  // Model, initialized as Megatron does, or from --load / checkpoint.load / checkpoint.save.
  model_ = moe::build_model(c_.model);
  model::init_megatron(*model_, static_cast<uint64_t>(t.seed));
  model_->set_recompute(t.recompute_granularity);
  bool auto_resume = false;
  const auto checkpoint = checkpoint_to_start_from(c_.checkpoint, auto_resume);
  shard_layout_ = ShardLayout{layout.pp(), layout.ep(), layout.layers_per_stage()};
  const bool sharded_checkpoint = checkpoint && is_sharded_checkpoint(checkpoint->dir);
  if (sharded_checkpoint) check_shard_layout(checkpoint->dir, shard_layout_);
  if (checkpoint && !sharded_checkpoint) load_model_weights(checkpoint->dir, *model_);
  // What a sharded checkpoint's shards.json lists: every tensor whole, before this rank drops any.
  for (auto& item : model_->named_parameters()) {
    full_model_shapes_[item.key()] = {item.value().sizes().begin(), item.value().sizes().end()};
  }
  // Expert parallel: every rank built the whole model (the same weights as one process); each now
  // keeps its EP rank's experts and dispatches through the all-to-all.
  dispatchers_ = moe::shard_experts(*model_, groups_.ep);
  if (t.bf16) model_->to(torch::kBFloat16);
  model_->to(device_);

  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (auto& item : model_->named_parameters()) named.emplace_back(item.key(), item.value());
  auto trainable = select_trainable(named, t);  // the patterns are checked against the whole model
  {
    std::vector<std::string> names;
    for (const auto& p : trainable) names.push_back(p.name);
    if (const auto why = router_only_noop_reason(*model_, c_.model, names)) spdlog::warn("{}", *why);
  }
  for (const auto& p : trainable) {
    const auto& shape = full_model_shapes_.at(p.name);
    for (const char* kind : {"exp_avg.", "exp_avg_sq."}) full_optimizer_shapes_[kind + p.name] = shape;
    if (t.bf16) full_optimizer_shapes_["master." + p.name] = shape;
  }
  // Pipeline parallel: this stage keeps its layers (the embedding on the first, norm and head on the
  // last); the other parameters are released and neither train nor count in this rank's norm.
  std::erase_if(trainable, [&](const TrainableParameter& p) { return !on_stage(p.name); });
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, p] : named) {
      if (on_stage(name)) continue;
      p.set_requires_grad(false);
      p.set_data(torch::empty({0}, p.options()));
    }
  }
  if (sharded_checkpoint) load_shard_weights(checkpoint->dir, coords);
  for (auto& p : trainable) p.expert_parallel = moe::is_expert_parallel_parameter(p.name);
  optimizer_ = make_optimizer(std::move(trainable), t, groups_, c_.parallel.use_distributed_optimizer);
  schedule_ = std::make_unique<LrSchedule>(t);
  if (checkpoint && checkpoint->resume) {
    state_ = load_training_state(checkpoint->dir, *optimizer_, t.bf16, ShardPosition{coords.pp, ep_rank_, ep_size_});
    schedule_->set_num_steps(state_.lr_num_steps);
    spdlog::info("resumed from {}{} at iteration {} ({} samples consumed)", checkpoint->dir,
                 auto_resume ? " (the latest in checkpoint.save)" : "", state_.iteration, state_.consumed_train_samples);
  } else if (checkpoint) {
    spdlog::info("initialized the model from {} (weights only: a fresh optimizer and schedule)", checkpoint->dir);
  }
  train_loader_ = std::make_unique<data::DataLoader>(train_data_, t.micro_batch_size, dp_rank_, dp_size_,
                                                     state_.consumed_train_samples);

  // What an MFU is computed from.
  const auto flops = model_flops_per_step(c_.model, t.global_batch_size, t.seq_length);
  flops_per_step_ = static_cast<double>(flops.megatron);
  flops_6n_per_step_ = static_cast<double>(flops.six_n);
  peak_ = resolve_peak(c_.hardware, t.bf16);

  const auto counts = count_parameters(c_.model);
  spdlog::info("{}", resolved_config_table(loaded_));
  spdlog::info("layout: {}", layout.describe());
  spdlog::info("model: {} parameters ({} activated), {} trainable on this rank in {} tensors; {} on {}; {}",
               human_count(counts.total), human_count(counts.activated),
               human_count(optimizer_->num_trainable_elements()), optimizer_->params().size(),
               t.bf16 ? "bf16 with fp32 master weights" : "fp32", device_.str(),
               c_.parallel.use_distributed_optimizer ? "distributed optimizer (Adam state sharded over DP)"
                                                     : "Adam state replicated");
  spdlog::info("data: train {} samples, valid {}", train_data_->size(),
               valid_data_ ? std::to_string(valid_data_->size()) + " samples" : std::string("none"));
  spdlog::info("FLOPs per step: {:.4g} (Megatron), {:.4g} (6N); peak {:.4g} TFLOP/s per device from {}", flops_per_step_,
               flops_6n_per_step_, peak_.tflops, peak_.source);

  const auto hostnames = gather_hostnames(*groups_.world);
  if (is_rank0()) {
    write_resolved_config(c_, c_.logging.run_dir);
    std::ofstream(fs::path(c_.logging.run_dir) / "environment.json")
        << run_environment(c_, hostnames, command).dump(2) << "\n";
    open_metrics();
  }
}

void Trainer::open_metrics() {
  const fs::path metrics_path = fs::path(c_.logging.run_dir) / "metrics.jsonl";
  // A fresh run starts the file anew; a resumed run keeps the lines up to its checkpoint (a run
  // killed after it had logged further would otherwise leave those iterations twice) and appends.
  if (state_.iteration > 0 && fs::exists(metrics_path)) {
    std::ifstream in(metrics_path);
    std::string line, kept;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.contains("iteration") && j["iteration"].is_number_integer() &&
          j["iteration"].get<int64_t>() <= state_.iteration) {
        kept += line + "\n";
      }
    }
    std::ofstream(metrics_path, std::ios::trunc) << kept;
  }
  metrics_.open(metrics_path, state_.iteration > 0 ? std::ios::app : std::ios::trunc);
  if (!metrics_) fail_user("cannot write {}: check logging.run_dir", metrics_path.string());
}

Trainer::Batch Trainer::to_tensors(const data::MicroBatch& mb) const {
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  const std::vector<int64_t> shape{mb.batch, mb.seq};
  auto from = [&](const auto& v, torch::TensorOptions o) {
    return torch::from_blob(const_cast<void*>(static_cast<const void*>(v.data())), shape, o).clone().to(device_);
  };
  return {from(mb.tokens, i64), from(mb.labels, i64), from(mb.loss_mask, torch::TensorOptions().dtype(torch::kFloat32)),
          from(mb.position_ids, i64)};
}

StepMetrics Trainer::train_step() {
  const auto& t = c_.training;
  const auto step_start = Clock::now();
  StepMetrics m;
  m.num_micro_batches = micro_batches_;
  m.lr = schedule_->current();
  // Summed on the device and read once per step: a GPU is not synchronized per micro-batch.
  auto losses = torch::zeros({4}, torch::TensorOptions().dtype(torch::kFloat64).device(device_));  // lm, aux, z, total
  // Routed slots per expert of every MoE layer of the model (zeros for other stages' layers).
  auto load_LE = torch::zeros({std::max<int64_t>(num_moe_layers_, 1), c_.model.num_experts.value_or(1)},
                              torch::TensorOptions().dtype(torch::kInt64).device(device_));
  double data_s = 0;
  for (auto& d : dispatchers_) d->stats().reset();
  StageCallbacks callbacks;
  callbacks.forward = [&](int64_t, const torch::Tensor& input) {
    auto t0 = Clock::now();
    const Batch b = to_tensors(train_loader_->next());
    data_s += seconds_since(t0);
    const auto out = model_->forward_layers(stage_begin_ == 0 ? b.tokens : input, b.position_ids, stage_begin_, stage_end_);
    const auto loss = moe::model_loss(c_.model, out, b.labels, b.loss_mask);
    losses += torch::stack({loss.lm, loss.aux, loss.z, loss.total}).detach().to(torch::kFloat64);
    for (size_t j = 0; j < out.layers.size(); ++j) {
      const auto& layer = out.layers[j];
      const int64_t moe = moe_index_[static_cast<size_t>(stage_begin_) + j];
      if (layer.tokens_per_expert_E && moe >= 0) load_LE[moe] += *layer.tokens_per_expert_E;
    }
    StageOutput o;
    o.output = out.hidden_BSD;
    // Backward runs on (LM + aux + z) / micro-batches; a stage without the head adds its layers'
    // auxiliary losses to the gradient coming from the next stage.
    if (loss.total.requires_grad()) o.loss = loss.total / static_cast<double>(micro_batches_);
    return o;
  };
  callbacks.after_backward = [&] { optimizer_->accumulate_grads(); };
  const auto times = run_1f1b(*groups_.pp, micro_batches_, activation_shape(), activation_options(), callbacks);
  // Losses are summed over the stages (the LM loss lives on the last, auxiliary losses on every
  // stage), then averaged over the data-parallel ranks; expert counts are summed.
  const auto reduce_start = Clock::now();
  optimizer_->reduce_grads();
  if (world_ > 1) {
    losses = losses.cpu();
    load_LE = load_LE.cpu().contiguous();
    groups_.pp->all_reduce(losses, ReduceOp::sum);
    groups_.pp->all_reduce(load_LE, ReduceOp::sum);
    groups_.dp->all_reduce(losses, ReduceOp::avg);
    groups_.dp->all_reduce(load_LE, ReduceOp::sum);
  }
  m.time_grad_reduce_s = seconds_since(reduce_start);
  if (!dispatchers_.empty()) record_dispatch(m);
  const double forward_s = times.forward_s - data_s, backward_s = times.backward_s;
  m.time_pipeline_wait_s = times.p2p_s;
  const auto mean_losses = (losses / static_cast<double>(micro_batches_)).cpu();
  m.lm_loss = mean_losses[0].item<double>();
  m.aux_loss = mean_losses[1].item<double>();
  m.z_loss = mean_losses[2].item<double>();
  m.loss = mean_losses[3].item<double>();
  const auto opt_start = Clock::now();
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
  m.time_optimizer_s = seconds_since(opt_start);
  ++state_.iteration;
  state_.consumed_train_samples += t.global_batch_size;
  state_.lr_num_steps = schedule_->num_steps();
  if (num_moe_layers_ > 0) {
    const auto load = load_LE.to(torch::kCPU, torch::kFloat64);
    for (int64_t l = 0; l < load.size(0); ++l) {
      const double mean = load[l].mean().item<double>();
      const double ratio = mean > 0 ? load[l].max().item<double>() / mean : 0.0;
      m.expert_load_per_layer.push_back(ratio);
      m.expert_load_max_over_mean = std::max(m.expert_load_max_over_mean, ratio);
    }
  }
  m.iteration = state_.iteration;
  m.train_iters = t.train_iters;
  m.consumed_samples = state_.consumed_train_samples;
  m.skipped_iterations = state_.skipped_iterations;
  m.time_data_s = data_s;
  m.time_forward_s = forward_s;
  m.time_backward_s = backward_s;
  m.step_time_s = seconds_since(step_start);
  const auto devices = static_cast<double>(world_);
  m.tokens_per_s_per_device = static_cast<double>(t.global_batch_size * t.seq_length) / m.step_time_s / devices;
  m.tflops_per_device = flops_per_step_ / m.step_time_s / 1e12 / devices;
  m.tflops_6n_per_device = flops_6n_per_step_ / m.step_time_s / 1e12 / devices;
  m.peak_tflops = peak_.tflops;
  m.peak_kind = peak_.kind;
  m.peak_source = peak_.source;
  m.mfu = m.tflops_per_device / peak_.tflops;
  m.mfu_6n = m.tflops_6n_per_device / peak_.tflops;
  m.peak_memory_bytes = peak_rss_bytes();
  if (world_ > 1) {
    // Every rank's breakdown (rank 0 writes it): the slow stage or the overloaded EP rank shows.
    const auto mine = torch::tensor({forward_s + backward_s - m.time_all_to_all_s, m.time_pipeline_wait_s,
                                     m.time_all_to_all_s, m.time_grad_reduce_s, m.time_optimizer_s, m.step_time_s},
                                    torch::kFloat64);
    const auto all = groups_.world->all_gather(mine.unsqueeze(0)).contiguous();  // [world, 6]
    const double* p = all.data_ptr<double>();
    for (int64_t r = 0; r < all.size(0); ++r, p += 6) m.rank_times.push_back({p[0], p[1], p[2], p[3], p[4], p[5]});
  }
  return m;
}

bool Trainer::on_stage(const std::string& name) const {
  if (name.starts_with("layers.")) {
    const int64_t layer = std::stoll(name.substr(7));
    return layer >= stage_begin_ && layer < stage_end_;
  }
  if (name.starts_with("embed_tokens.")) return stage_begin_ == 0;
  return stage_end_ == c_.model.num_layers;  // the final norm and the head
}

std::vector<int64_t> Trainer::activation_shape() const {
  return {c_.training.micro_batch_size, c_.training.seq_length, c_.model.hidden_size};
}

torch::TensorOptions Trainer::activation_options() const {
  return torch::TensorOptions().dtype(c_.training.bf16 ? torch::kBFloat16 : torch::kFloat32).device(device_);
}

void Trainer::record_dispatch(StepMetrics& m) {
  // Rows received per rank and layer, gathered over DP: load imbalance across EP ranks is what
  // slows expert-parallel steps down, and what users look for.
  // Dispatchers of other stages' layers moved nothing: the sum over the pipeline fills every layer.
  auto received = torch::empty({static_cast<int64_t>(dispatchers_.size())}, torch::kInt64);
  for (size_t l = 0; l < dispatchers_.size(); ++l) {
    const auto& s = dispatchers_[l]->stats();
    received[static_cast<int64_t>(l)] = s.rows_received;
    m.all_to_all_bytes_sent += s.bytes_sent;
    m.time_all_to_all_s += s.seconds;
  }
  groups_.pp->all_reduce(received, ReduceOp::sum);
  const auto per_rank_L = groups_.dp->all_gather(received.unsqueeze(0)).t().contiguous();  // [layers, DP]
  for (int64_t l = 0; l < per_rank_L.size(0); ++l) {
    const auto row = per_rank_L[l];
    m.ep_tokens_received.emplace_back(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
    const double mean = row.to(torch::kFloat64).mean().item<double>();
    if (mean > 0) m.ep_tokens_received_max_over_mean = std::max(m.ep_tokens_received_max_over_mean, row.max().item<double>() / mean);
  }
}

double Trainer::evaluate() {
  // Megatron's validation iterator continues where the previous evaluation stopped.
  const auto& t = c_.training;
  torch::NoGradGuard no_grad;
  data::DataLoader loader(valid_data_, t.micro_batch_size, dp_rank_, dp_size_, state_.consumed_valid_samples, 2);
  double total = 0;  // the LM loss, on the last stage
  for (int64_t it = 0; it < t.eval_iters; ++it) {
    run_forward_only(*groups_.pp, micro_batches_, activation_shape(), activation_options(),
                     [&](int64_t, const torch::Tensor& input) {
                       const Batch b = to_tensors(loader.next());
                       const auto out = model_->forward_layers(stage_begin_ == 0 ? b.tokens : input, b.position_ids,
                                                               stage_begin_, stage_end_);
                       if (out.logits_BSV.defined()) total += model::lm_loss(out.logits_BSV, b.labels, b.loss_mask).item<double>();
                       return StageOutput{out.hidden_BSD, {}};
                     });
    state_.consumed_valid_samples += t.global_batch_size;
  }
  auto mean = torch::full({1}, total / static_cast<double>(t.eval_iters * micro_batches_), torch::kFloat64);
  groups_.pp->all_reduce(mean, ReduceOp::sum);
  groups_.dp->all_reduce(mean, ReduceOp::avg);
  return mean.item<double>();
}

void Trainer::save() {
  const auto t0 = Clock::now();
  const auto& k = c_.checkpoint;
  CheckpointContents contents;
  contents.optimizer = optimizer_->state();  // collective: a sharded optimizer gathers over DP
  contents.optimizer_steps = optimizer_->steps();
  for (auto& item : model_->named_parameters()) {
    if (on_stage(item.key())) contents.model.emplace_back(item.key(), item.value().detach());
  }
  std::string dir;
  if (k.format == CheckpointFormat::sharded) {
    // Rank 0 prepares the directory and names it; the first expert-DP replica of every (stage, EP
    // rank) writes its shard; rank 0 commits once all have written.
    auto tag = torch::full({1}, static_cast<int64_t>(::getpid()), torch::kInt64);
    if (is_rank0()) prepare_checkpoint_dir(k.save, state_.iteration, tag.item<int64_t>());
    groups_.world->broadcast(tag, 0);
    const std::string tmp = checkpoint_tmp_dir(k.save, state_.iteration, tag.item<int64_t>());
    groups_.world->barrier();
    if (dp_rank_ < ep_size_) write_shard(tmp, stage_, ep_rank_, contents.model, contents.optimizer);
    groups_.world->barrier();
    if (is_rank0()) {
      write_shard_manifest(tmp, shard_layout_, full_model_shapes_, full_optimizer_shapes_);
      dir = commit_checkpoint(k.save, tmp, state_, contents.optimizer_steps, c_, k.keep_latest_k,
                              {{"format", "sharded"}});
    }
  } else {
    // Whole: experts gathered over EP, stages to the first; rank 0 writes.
    moe::gather_expert_parallel(contents.model, *groups_.ep);
    moe::gather_expert_parallel(contents.optimizer, *groups_.ep);
    gather_to_first_stage(contents.model, *groups_.pp);
    gather_to_first_stage(contents.optimizer, *groups_.pp);
    if (is_rank0()) dir = save_checkpoint(k.save, state_, contents, c_, k.keep_latest_k);
  }
  if (is_rank0()) spdlog::info("saved checkpoint {} in {:.2f} s", dir, seconds_since(t0));
  groups_.world->barrier();
}

void Trainer::load_shard_weights(const std::string& dir, const RankCoordinates& coords) {
  const ShardReader shard(dir, coords.pp, coords.ep);
  std::vector<std::string> problems;
  torch::NoGradGuard no_grad;
  for (auto& item : model_->named_parameters()) {
    if (!on_stage(item.key())) continue;
    const auto from = shard.model(item.key());
    if (!from) {
      problems.push_back(item.key() + " missing");
    } else if (from->sizes() != item.value().sizes()) {
      problems.push_back(fmt::format("{}: shard [{}], model [{}]", item.key(), fmt::join(from->sizes(), ", "),
                                     fmt::join(item.value().sizes(), ", ")));
    } else {
      item.value().copy_(*from);
    }
  }
  if (!problems.empty()) {
    fail_user("{} does not match the configured model ({} problem{}):\n  - {}\nFix the config's model section or load "
              "another checkpoint.",
              shard.describe(), problems.size(), problems.size() > 1 ? "s" : "", fmt::join(problems, "\n  - "));
  }
}

int Trainer::train() {
  const auto& t = c_.training;
  const auto start = Clock::now();
  if (state_.iteration >= t.train_iters) {
    spdlog::info("nothing to do: the checkpoint is at iteration {} and training.train_iters is {}", state_.iteration,
                 t.train_iters);
    return 0;
  }
  const int64_t first = state_.iteration + 1;
  while (state_.iteration < t.train_iters) {
    StepMetrics m = train_step();
    const bool last = state_.iteration == t.train_iters;
    const bool eval_now = valid_data_ && t.eval_iters > 0 && (state_.iteration % t.eval_interval == 0 || last);
    nlohmann::json extra;
    if (eval_now) {
      const auto t0 = Clock::now();
      m.valid_lm_loss = evaluate();
      extra["time_eval_s"] = seconds_since(t0);
    }
    if (state_.iteration % c_.logging.log_interval == 0 || last) spdlog::info("{}", step_log_line(m));
    if (m.valid_lm_loss) {
      spdlog::info("validation at iteration {} | lm loss: {:.6E} | lm loss PPL: {:.6E}", m.iteration, *m.valid_lm_loss,
                   std::exp(std::min(*m.valid_lm_loss, 20.0)));
    }
    if (is_rank0()) {
      auto j = step_metrics_json(m);
      if (!extra.is_null()) j.update(extra);
      metrics_ << j.dump() << "\n";
      metrics_.flush();
    }
    const bool save_now = !c_.checkpoint.save.empty() &&
                          (last || (c_.checkpoint.save_interval && state_.iteration % *c_.checkpoint.save_interval == 0));
    if (save_now) save();
  }
  const double total = seconds_since(start);
  spdlog::info("trained iterations {}..{} in {:.1f} s; metrics: {}", first, state_.iteration, total,
               (fs::path(c_.logging.run_dir) / "metrics.jsonl").string());
  if (!c_.checkpoint.save.empty()) {
    spdlog::info("checkpoint: {}", (fs::path(c_.checkpoint.save) / fmt::format("iter_{:07d}", state_.iteration)).string());
  }
  return 0;
}

int run_train(const TrainOptions& o) {
  auto overrides = o.overrides;
  if (!o.load.empty()) overrides.push_back("checkpoint.load=" + o.load);
  LoadedConfig loaded = load_config(o.config_path, overrides);
  set_log_level(loaded.config.logging.log_level);
  if (o.dry_run) return run_train_dry_run(loaded, o.world_size);
  try {
    Trainer trainer(std::move(loaded), o.command);
    return trainer.train();
  } catch (const std::exception& e) {
    // An error on some ranks of a running job would leave the others waiting in a collective until
    // the timeout: end the whole job now.
    int initialized = 0, finalized = 0, size = 1;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (initialized && !finalized) MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > 1) {
      std::fprintf(stderr, "error: rank %d: %s\n", launcher_rank(), e.what());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, dynamic_cast<const UserError*>(&e) ? 1 : 3);
    }
    throw;
  }
}

}  // namespace moeforge
