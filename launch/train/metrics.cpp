#include "launch/train/metrics.h"

#include "core/files/durable_file.h"
#include "core/base/errors.h"
#include "core/device/host_sync.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>

namespace moeforge {

namespace {

int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

}  // namespace

StepMeter::StepMeter(const torch::Device& device, const StepWork& work, DevicePeaks& peaks)
    : start_(std::chrono::steady_clock::now()),
      syncs_before_(host_syncs()),
      comm_before_(comm_times()),
      timer_(device),
      work_(work),
      device_(device),
      peaks_(peaks) {
  peaks_.begin();
}

void StepMeter::finish(StepMetrics& m) {
  const auto phase_s = timer_.finish();  // on a GPU: waits for the step's work to end
  auto of = [&](Phase p) { return phase_s[static_cast<size_t>(p)]; };
  m.time_data_s = of(Phase::data);
  m.time_forward_s = of(Phase::forward) - of(Phase::data);  // the forward phase includes its data
  m.time_backward_s = of(Phase::backward);
  m.time_pipeline_wait_s = of(Phase::pipeline_wait);
  m.time_grad_reduce_s = of(Phase::grad_reduce);
  m.time_optimizer_s = of(Phase::optimizer);
  m.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  m.host_syncs = host_syncs() - syncs_before_;
  const CommTimes comm = comm_times();
  m.time_comm_s = comm.in_flight_s - comm_before_.in_flight_s;
  m.time_comm_exposed_s = comm.exposed_s - comm_before_.exposed_s;
  m.time_comm_thread_cpu_s = comm.comm_thread_cpu_s - comm_before_.comm_thread_cpu_s;
  m.tokens_per_s_per_device = work_.tokens / m.step_time_s / work_.devices;
  m.tflops_per_device = work_.flops / m.step_time_s / 1e12 / work_.devices;
  m.tflops_6n_per_device = work_.flops_6n / m.step_time_s / 1e12 / work_.devices;
  m.peak_tflops = work_.peak.tflops;
  m.peak_kind = work_.peak.kind;
  m.peak_source = work_.peak.source;
  m.mfu = m.tflops_per_device / work_.peak.tflops;
  m.mfu_6n = m.tflops_6n_per_device / work_.peak.tflops;
  m.peak_memory_bytes = peak_rss_bytes();
  m.step_device_memory = peaks_.end();
  m.device_memory = peaks_.since_start();
}

void set_losses(StepMetrics& m, const ReducedLosses& r, const ModelConfig& mc) {
  m.lm_loss = r.lm;
  m.aux_loss = r.aux;
  m.z_loss = r.z;
  m.loss = r.total;
  m.moe_layers = mc.is_moe() ? mc.num_moe_layers() : 0;
  if (mc.moe_aux_loss_coeff > 0) m.balancing_name = megatron_balancing_name(mc.moe_router_load_balancing_type);
  m.z_loss_on = mc.moe_z_loss_coeff > 0;
  if (!r.load_LE.defined()) return;
  for (int64_t l = 0; l < r.load_LE.size(0); ++l) {
    // load_LE is on the host already (StepLosses::reduce): no device sync.
    const auto load_E = r.load_LE[l];
    const auto counts = load_E.to(torch::kInt64).contiguous();  // exact: fp64 counts far below 2^53
    m.expert_tokens_per_layer.emplace_back(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + counts.numel());
    const double mean = load_E.mean().item<double>();
    const double ratio = mean > 0 ? load_E.max().item<double>() / mean : 0.0;
    m.expert_load_per_layer.push_back(ratio);
    m.expert_idle_per_layer.push_back(load_E.eq(0).sum().item<int64_t>());
    m.expert_load_max_over_mean = std::max(m.expert_load_max_over_mean, ratio);
  }
}

void set_progress(StepMetrics& m, const TrainState& state, const ExperimentConfig& c) {
  m.iteration = state.iteration;
  m.consumed_samples = state.consumed_train_samples;
  m.skipped_iterations = state.skipped_iterations;
  m.train_iters = c.training.train_iters;
  m.forced_load_balance = c.model.moe_router_force_load_balancing;
}

const char* megatron_balancing_name(LoadBalancingType type) {
  switch (type) {
    case LoadBalancingType::aux_loss: return metric::kLoadBalancingLoss;
    case LoadBalancingType::seq_aux_loss: return metric::kSeqLoadBalancingLoss;
    case LoadBalancingType::global_aux_loss: return metric::kGlobalLoadBalancingLoss;
    case LoadBalancingType::hf_pooled_aux_loss:
    case LoadBalancingType::none: return nullptr;
  }
  return nullptr;
}

namespace {
// Megatron's per-MoE-layer mean of a sum over MoE layers.
double per_moe_layer(double sum, int64_t moe_layers) { return moe_layers > 0 ? sum / static_cast<double>(moe_layers) : 0.0; }
}  // namespace

nlohmann::json step_metrics_json(const StepMetrics& m) {
  nlohmann::json j = {
      {metric::kIteration, m.iteration},
      {metric::kTrainIters, m.train_iters},
      {metric::kConsumedSamples, m.consumed_samples},
      {metric::kNumMicroBatches, m.num_micro_batches},
      {metric::kLmLoss, m.lm_loss},
      {metric::kAuxLoss, m.aux_loss},
      {metric::kZLoss, per_moe_layer(m.z_loss, m.moe_layers)},
      {metric::kLoss, m.loss},
      {metric::kLr, m.lr},
      {metric::kGradNorm, m.grad_norm},
      {metric::kSkipped, m.skipped},
      {metric::kSkippedIterations, m.skipped_iterations},
      {metric::kExpertLoadMaxOverMean, m.expert_load_max_over_mean},
      {metric::kExpertLoadPerLayer, m.expert_load_per_layer},
      {metric::kExpertIdlePerLayer, m.expert_idle_per_layer},
      {metric::kHostSyncs, m.host_syncs},
      {metric::kStepTime, m.step_time_s},
      {metric::kTimeData, m.time_data_s},
      {metric::kTimeForward, m.time_forward_s},
      {metric::kTimeBackward, m.time_backward_s},
      {metric::kTimeGradReduce, m.time_grad_reduce_s},
      {metric::kTimeOptimizer, m.time_optimizer_s},
      {metric::kTimePipelineWait, m.time_pipeline_wait_s},
      {metric::kTimeComm, m.time_comm_s},
      {metric::kTimeCommExposed, m.time_comm_exposed_s},
      {metric::kTimeCommThreadCpu, m.time_comm_thread_cpu_s},
      {metric::kTokensPerSecond, m.tokens_per_s_per_device},
      {metric::kTflops, m.tflops_per_device},
      {metric::kTflops6N, m.tflops_6n_per_device},
      {metric::kMfu, m.mfu},
      {metric::kMfu6N, m.mfu_6n},
      {metric::kPeakTflops, m.peak_tflops},
      {metric::kPeakSource, m.peak_source},
      {metric::kPeakMemory, m.peak_memory_bytes},
      {metric::kTimestamp, std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count()},
  };
  if (m.balancing_name) j[m.balancing_name] = per_moe_layer(m.aux_loss, m.moe_layers);
  // JSON has no NaN or infinity: a non-finite value is written as null (the iteration is skipped).
  for (const char* key : {metric::kLmLoss, metric::kAuxLoss, metric::kZLoss, metric::kLoss, metric::kGradNorm,
                          m.balancing_name}) {
    if (key && !std::isfinite(j[key].get<double>())) j[key] = nullptr;
  }
  if (m.forced_load_balance) j[metric::kForcedLoadBalance] = true;
  if (!m.ep_tokens_received.empty()) {
    j[metric::kEpTokensReceived] = m.ep_tokens_received;
    j[metric::kEpTokensReceivedMaxOverMean] = m.ep_tokens_received_max_over_mean;
    j[metric::kAllToAllBytesSent] = m.all_to_all_bytes_sent;
    j[metric::kTimeAllToAll] = m.time_all_to_all_s;
  }
  if (m.device_memory) {
    j[metric::kPeakMemoryAllocated] = m.device_memory->peak_allocated_bytes;
    j[metric::kPeakMemoryReserved] = m.device_memory->peak_reserved_bytes;
    j[metric::kDeviceMemoryTotal] = m.device_memory->total_bytes;
  }
  if (m.step_device_memory) {
    j[metric::kStepPeakMemoryAllocated] = m.step_device_memory->peak_allocated_bytes;
    j[metric::kStepPeakMemoryReserved] = m.step_device_memory->peak_reserved_bytes;
  }
  if (m.save_device_memory) {
    j[metric::kSavePeakMemoryAllocated] = m.save_device_memory->peak_allocated_bytes;
    j[metric::kSavePeakMemoryReserved] = m.save_device_memory->peak_reserved_bytes;
  }
  for (const auto& [key, per_rank] : m.rank_times) j[metric::kRankTimes][key] = per_rank;
  if (m.energy_per_step_j) {
    j[metric::kEnergyPerStep] = *m.energy_per_step_j;
    j[metric::kPower] = *m.energy_per_step_j / m.step_time_s;
    j[metric::kEnergySource] = m.energy_source;
  }
  if (m.valid_lm_loss) {
    j[metric::kValidLmLoss] = *m.valid_lm_loss;
    j[metric::kValidPpl] = std::exp(std::min(*m.valid_lm_loss, 20.0));  // Megatron caps the exponent at 20
  }
  return j;
}

nlohmann::json expert_loads_json(const StepMetrics& m) {
  return {{metric::kIteration, m.iteration}, {kTokensPerExpert, m.expert_tokens_per_layer}};
}

std::string step_log_line(const StepMetrics& m) {
  const int width = static_cast<int>(std::to_string(m.train_iters).size());
  std::string line = fmt::format(
      "iteration {:>{}}/{} | consumed samples: {} | elapsed time per iteration (ms): {:.1f} | tokens/s/device: {:.0f} | "
      "TFLOP/s/device: {:.3f} | MFU: {:.2f}% | MFU(6N): {:.2f}% (peak {:.3g} TFLOP/s, {}) | learning rate: {:.6E} | "
      "lm loss: {:.6E} | ",
      m.iteration, width, m.train_iters, m.consumed_samples, m.step_time_s * 1e3, m.tokens_per_s_per_device,
      m.tflops_per_device, 100 * m.mfu, 100 * m.mfu_6n, m.peak_tflops, m.peak_kind, m.lr, m.lm_loss);
  // The MoE losses as Megatron's log line names them (means over MoE layers); the pooled
  // Hugging Face loss, which has no per-layer value, as transformers names it.
  if (m.balancing_name) {
    line += fmt::format("{}: {:.6E} | ", m.balancing_name, per_moe_layer(m.aux_loss, m.moe_layers));
  } else if (m.moe_layers > 0 && m.aux_loss != 0) {
    line += fmt::format("aux_loss: {:.6E} | ", m.aux_loss);
  }
  if (m.z_loss_on) line += fmt::format("z_loss: {:.6E} | ", per_moe_layer(m.z_loss, m.moe_layers));
  line += fmt::format("grad norm: {:.4f} | skipped iterations: {}", m.grad_norm, m.skipped_iterations);
  if (!m.expert_load_per_layer.empty()) line += fmt::format(" | expert load max/mean: {:.2f}", m.expert_load_max_over_mean);
  if (!m.ep_tokens_received.empty()) {
    line += fmt::format(" | EP tokens received max/mean: {:.2f} | all-to-all (ms): {:.1f}", m.ep_tokens_received_max_over_mean,
                        m.time_all_to_all_s * 1e3);
  }
  if (m.skipped) line += " | SKIPPED (non-finite loss or gradient)";
  if (m.forced_load_balance) line += " | FORCED LOAD BALANCE (benchmark: the loss is not a training result)";
  return line;
}

MetricsFile::MetricsFile(const std::filesystem::path& path, int64_t resumed_iteration) : path_(path) {
  if (resumed_iteration > 0 && std::filesystem::exists(path)) {
    std::ifstream in(path);
    std::string line, kept;
    int64_t torn = 0, later = 0;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      const bool readable = !j.is_discarded() && j.contains(metric::kIteration) && j[metric::kIteration].is_number_integer();
      if (!readable) ++torn;
      else if (j[metric::kIteration].get<int64_t>() > resumed_iteration) ++later;
      else kept += line + "\n";
    }
    // A line cut short (a full disk, a killed run) is dropped, and said so; iterations logged past
    // the checkpoint are dropped because this run logs them again.
    if (torn > 0) {
      spdlog::warn("{}: dropped {} unreadable line{} (a write cut short by a full disk or a killed run)", path.string(),
                   torn, torn > 1 ? "s" : "");
    }
    if (later > 0) spdlog::info("{}: dropped {} line(s) past iteration {}, which this run logs again", path.string(), later, resumed_iteration);
    write_file_durably(path, kept);
  }
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (resumed_iteration > 0 ? O_APPEND : O_TRUNC), 0644);
  if (fd_ < 0) fail_user("cannot write {}: {}. Check logging.run_dir.", path.string(), std::strerror(errno));
}

MetricsFile::~MetricsFile() {
  if (fd_ >= 0) ::close(fd_);
}

void MetricsFile::append(const nlohmann::json& line) {
  // One write(2) per line, checked: what the kernel accepted survives a crash of this process, and
  // a full disk or a file-size limit ends the run instead of silently losing every later line.
  const std::string text = line.dump() + "\n";
  const size_t done = write_fully(fd_, text);
  if (done < text.size()) {
    fail_user("cannot write {}: {} (after {} of the line's {} bytes). Free space on its filesystem or set "
              "logging.run_dir elsewhere; a resumed run repairs the cut line.",
              path_.string(), errno != 0 ? std::strerror(errno) : "no bytes written", done, text.size());
  }
}

}  // namespace moeforge
