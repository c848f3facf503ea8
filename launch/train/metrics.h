// defines: StepMetrics, the metric key schema (namespace metric), kTimingMetricKeys,
//          StepMeter, set_losses, set_progress, step_metrics_json, step_log_line, MetricsFile
//
// What one training iteration reports: the Megatron-like log line and one JSON object per
// iteration in <run_dir>/metrics.jsonl (keys in docs/training.md). The keys are named once, here:
// the trainer writes them and `moeforge report` reads them through the same names. Keys that
// depend on timing or the machine are listed in kTimingMetricKeys; everything else is
// bit-identical between two runs of the same config on CPU, and between a resumed and an
// uninterrupted run.
#pragma once

#include "core/config/config.h"
#include "core/device/device_memory.h"
#include "core/device/step_timer.h"
#include "core/flops/mfu.h"
#include "launch/train/checkpoint.h"
#include "launch/train/step_losses.h"
#include "parallel/comm/work.h"

#include <nlohmann/json.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge {

namespace metric {
inline constexpr const char* kIteration = "iteration";
inline constexpr const char* kTrainIters = "train_iters";
inline constexpr const char* kConsumedSamples = "consumed_samples";
inline constexpr const char* kNumMicroBatches = "num_micro_batches";
inline constexpr const char* kLmLoss = "lm_loss";
// moeforge's: the load-balancing loss without its coefficient, summed over MoE layers (for
// hf_pooled_aux_loss: transformers' aux_loss, pooled over the layers), averaged over
// micro-batches and DP ranks: what `loss` adds moe_aux_loss_coeff times.
inline constexpr const char* kAuxLoss = "aux_loss";
// Megatron-Core's names and meanings (track_moe_metrics): the loss without its coefficient,
// averaged over micro-batches, DP ranks and MoE layers (the sum over layers / MoE layers), logged
// only when its coefficient is positive; which name depends on the balancing type
// (megatron_balancing_name). Under hf_pooled_aux_loss no per-layer value exists: only aux_loss.
inline constexpr const char* kLoadBalancingLoss = "load_balancing_loss";
inline constexpr const char* kSeqLoadBalancingLoss = "seq_load_balancing_loss";
inline constexpr const char* kGlobalLoadBalancingLoss = "global_load_balancing_loss";
inline constexpr const char* kZLoss = "z_loss";  // Megatron's too: mean over MoE layers, without its coefficient
inline constexpr const char* kLoss = "loss";
inline constexpr const char* kLr = "lr";
inline constexpr const char* kGradNorm = "grad_norm";
inline constexpr const char* kSkipped = "skipped";
inline constexpr const char* kSkippedIterations = "skipped_iterations";
inline constexpr const char* kExpertLoadMaxOverMean = "expert_load_max_over_mean";
inline constexpr const char* kExpertLoadPerLayer = "expert_load_per_layer";
inline constexpr const char* kExpertIdlePerLayer = "expert_idle_per_layer";
// On the one iteration that confirmed a routing collapse (launch/train/routing_health.h).
inline constexpr const char* kRoutingCollapse = "routing_collapse";
inline constexpr const char* kHostSyncs = "host_syncs";
inline constexpr const char* kStepTime = "step_time_s";
inline constexpr const char* kTimeData = "time_data_s";
inline constexpr const char* kTimeForward = "time_forward_s";
inline constexpr const char* kTimeBackward = "time_backward_s";
inline constexpr const char* kTimeGradReduce = "time_grad_reduce_s";
inline constexpr const char* kTimeOptimizer = "time_optimizer_s";
inline constexpr const char* kTimePipelineWait = "time_pipeline_wait_s";
inline constexpr const char* kTimeAllToAll = "time_all_to_all_s";
inline constexpr const char* kTimeComm = "time_comm_s";
inline constexpr const char* kTimeCommExposed = "time_comm_exposed_s";
inline constexpr const char* kTimeCommThreadCpu = "time_comm_thread_cpu_s";
inline constexpr const char* kTimeEval = "time_eval_s";
inline constexpr const char* kTokensPerSecond = "tokens_per_s_per_device";
inline constexpr const char* kTflops = "tflops_per_device";
inline constexpr const char* kTflops6N = "tflops_6n_per_device";
inline constexpr const char* kMfu = "mfu";
inline constexpr const char* kMfu6N = "mfu_6n";
inline constexpr const char* kPeakTflops = "peak_tflops";
inline constexpr const char* kPeakSource = "peak_source";
inline constexpr const char* kPeakMemory = "peak_memory_bytes";  // host resident memory (every run)
// CUDA runs only: the caching allocator's peaks on this rank's GPU and the GPU's total.
inline constexpr const char* kPeakMemoryAllocated = "peak_memory_allocated_bytes";
inline constexpr const char* kPeakMemoryReserved = "peak_memory_reserved_bytes";
inline constexpr const char* kDeviceMemoryTotal = "device_memory_total_bytes";
// The same over this step alone (the allocator's peaks reset as it starts), and over the save made
// after the previous iteration (on the first iteration after a save).
inline constexpr const char* kStepPeakMemoryAllocated = "step_peak_memory_allocated_bytes";
inline constexpr const char* kStepPeakMemoryReserved = "step_peak_memory_reserved_bytes";
inline constexpr const char* kSavePeakMemoryAllocated = "save_peak_memory_allocated_bytes";
inline constexpr const char* kSavePeakMemoryReserved = "save_peak_memory_reserved_bytes";
inline constexpr const char* kTimestamp = "timestamp";
inline constexpr const char* kEpTokensReceived = "ep_tokens_received";
inline constexpr const char* kEpTokensReceivedMaxOverMean = "ep_tokens_received_max_over_mean";
inline constexpr const char* kAllToAllBytesSent = "all_to_all_bytes_sent";
inline constexpr const char* kRankTimes = "rank_times";
// Where rank 0's device exposes an energy counter (launch/train/energy.h): the step's joules, their
// average power over the step, and the counter's source. Absent otherwise ("not recorded").
inline constexpr const char* kEnergyPerStep = "energy_per_step_j";
inline constexpr const char* kPower = "power_w";
inline constexpr const char* kEnergySource = "energy_source";
inline constexpr const char* kValidLmLoss = "valid_lm_loss";
inline constexpr const char* kValidPpl = "valid_ppl";
// Present (true) only in runs with model.moe_router_force_load_balancing: their loss is not a
// training result.
inline constexpr const char* kForcedLoadBalance = "moe_router_force_load_balancing";
}  // namespace metric

struct StepMetrics {
  int64_t iteration = 0, train_iters = 0, consumed_samples = 0, num_micro_batches = 0;
  // loss = lm + coefficients * (aux, z), aux and z summed over the MoE layers here.
  double lm_loss = 0, aux_loss = 0, z_loss = 0, loss = 0;
  // For Megatron's keys: the balancing loss's Megatron name (nullptr: none is logged: the type is
  // hf_pooled_aux_loss or none, or its coefficient is 0), whether the z-loss runs, and the number
  // of MoE layers the sums divide by.
  const char* balancing_name = nullptr;
  bool z_loss_on = false;
  int64_t moe_layers = 0;
  double lr = 0, grad_norm = 0;
  bool skipped = false;
  bool forced_load_balance = false;  // model.moe_router_force_load_balancing
  int64_t skipped_iterations = 0;
  std::vector<double> expert_load_per_layer;  // per MoE layer: max over experts / mean over experts
  double expert_load_max_over_mean = 0;       // the largest of those
  std::vector<int64_t> expert_idle_per_layer;  // per MoE layer: experts that received no slot
  // Per MoE layer, the slots routed to each expert over the global batch (every DP/EP rank and
  // micro-batch): expert_loads.jsonl's line.
  std::vector<std::vector<int64_t>> expert_tokens_per_layer;
  // Expert parallel only (empty otherwise): per MoE layer, the rows each DP rank's experts received
  // over the step's micro-batches (dp rank order), the largest max/mean over ranks of any layer,
  // and the bytes this rank sent in all-to-alls (forward and backward, rows kept locally excluded).
  std::vector<std::vector<int64_t>> ep_tokens_received;
  double ep_tokens_received_max_over_mean = 0;
  int64_t all_to_all_bytes_sent = 0;
  // Times this rank's host waited for its device in the step (core/device/host_sync.h: on CPU, where a
  // GPU would have waited).
  int64_t host_syncs = 0;
  // Timing and machine-dependent values. On GPUs the phases are CUDA-event times on the compute
  // stream (core/device/step_timer.h); the step time is the host's, to the end of the device's work.
  double step_time_s = 0, time_data_s = 0, time_forward_s = 0, time_backward_s = 0, time_grad_reduce_s = 0;
  double time_optimizer_s = 0, time_all_to_all_s = 0;  // all-to-all time is part of forward and backward
  double time_pipeline_wait_s = 0;  // in pipeline sends and receives (bubble and transfers); 0 without PP
  // Wall time with at least one collective in flight, and the part the compute thread waited for
  // one (parallel/comm/work.h); their difference is the communication hidden behind compute.
  double time_comm_s = 0, time_comm_exposed_s = 0;
  double time_comm_thread_cpu_s = 0;  // CPU time of the communication threads (they share cores with compute)
  double tokens_per_s_per_device = 0, tflops_per_device = 0, tflops_6n_per_device = 0;
  double mfu = 0, mfu_6n = 0, peak_tflops = 0;
  std::string peak_kind, peak_source;  // PeakFlops::kind and ::source
  int64_t peak_memory_bytes = 0;
  std::optional<DeviceMemory> device_memory;  // accelerator runs: peaks since start
  std::optional<DeviceMemory> step_device_memory, save_device_memory;  // this step's; the last save's (once)
  // Several ranks only: every rank's breakdown, named values (rank_times.<key>[rank], in world-rank
  // order): compute_s (forward + backward outside all-to-alls), pipeline_wait_s, all_to_all_s,
  // grad_reduce_s, optimizer_s, step_s, comm_s and comm_exposed_s (time_comm_s and
  // time_comm_exposed_s), peak_memory_bytes (host resident) and peak_memory_reserved_bytes (GPU; 0
  // on CPU), compute_before_all_to_all_s (EP: ComputeBeforeAllToAll). A record: new values are appended where the trainer makes it.
  std::vector<std::pair<std::string, std::vector<double>>> rank_times;
  std::optional<double> valid_lm_loss;  // iterations that evaluated
  std::optional<double> energy_per_step_j;  // rank 0's device, where it has an energy counter
  std::string energy_source;
};

inline constexpr std::array<std::string_view, 28> kTimingMetricKeys{
    metric::kStepTime,   metric::kTimeData,     metric::kTimeForward,       metric::kTimeBackward,
    metric::kTimeOptimizer, metric::kTimeGradReduce, metric::kTimeAllToAll, metric::kTimePipelineWait,
    metric::kTokensPerSecond, metric::kTflops,  metric::kTflops6N,          metric::kMfu,
    metric::kMfu6N,      metric::kPeakTflops,   metric::kPeakSource,        metric::kPeakMemory,
    metric::kTimeEval,   metric::kTimestamp,    metric::kRankTimes,         metric::kPeakMemoryAllocated,
    metric::kPeakMemoryReserved, metric::kDeviceMemoryTotal, metric::kTimeComm, metric::kTimeCommExposed,
    metric::kTimeCommThreadCpu, metric::kEnergyPerStep, metric::kPower, metric::kEnergySource};

// What a step's throughput is measured against.
struct StepWork {
  double tokens = 0;                        // global batch x sequence
  double flops = 0, flops_6n = 0;           // per step: Megatron's count and 6N (core/flops/mfu.h)
  PeakFlops peak;                           // per device
  double devices = 1;
};

// Measures one step: the wall time from its construction, the host syncs and communication times
// counted meanwhile, and the device phases of timer(). finish() writes those, the throughput and
// the memory peaks into the step's metrics (on a GPU it waits for the step's work to end first).
class StepMeter {
 public:
  // Starts the step's window of `peaks` (the trainer's, for its device).
  StepMeter(const torch::Device& device, const StepWork& work, DevicePeaks& peaks);
  StepTimer& timer() { return timer_; }
  void finish(StepMetrics& m);

 private:
  std::chrono::steady_clock::time_point start_;
  int64_t syncs_before_;
  CommTimes comm_before_;
  StepTimer timer_;
  StepWork work_;
  torch::Device device_;
  DevicePeaks& peaks_;
};

// The step's reduced losses into its metrics (with Megatron's names for the balancing and z
// losses) and each MoE layer's expert load, max over mean, and its idle experts.
void set_losses(StepMetrics& m, const ReducedLosses& losses, const ModelConfig& model);
// Where training stands after the step: iteration, samples, skipped updates.
void set_progress(StepMetrics& m, const TrainState& state, const ExperimentConfig& config);

// Megatron-Core's log name of a balancing type's loss; nullptr for types Megatron does not have.
const char* megatron_balancing_name(LoadBalancingType type);

nlohmann::json step_metrics_json(const StepMetrics& m);

// <run_dir>/expert_loads.jsonl's line (every logging.expert_loads_interval iterations, and the last):
// {"iteration": N, "tokens_per_expert": [[per expert] per MoE layer]} (docs/report.md).
nlohmann::json expert_loads_json(const StepMetrics& m);
inline constexpr const char* kTokensPerExpert = "tokens_per_expert";

// "iteration   10/  40 | consumed samples: 160 | elapsed time per iteration (ms): 812.3 | ..."
std::string step_log_line(const StepMetrics& m);

// <run_dir>/metrics.jsonl, one line per iteration, each written by one checked write(2). A fresh
// run starts the file anew; a resumed run keeps the lines up to its checkpoint's iteration (a run
// killed after it had logged further would otherwise leave those iterations twice), drops a line
// cut short (with a warning) and appends.
class MetricsFile {
 public:
  MetricsFile(const std::filesystem::path& path, int64_t resumed_iteration);
  ~MetricsFile();
  MetricsFile(const MetricsFile&) = delete;
  MetricsFile& operator=(const MetricsFile&) = delete;
  void append(const nlohmann::json& line);  // UserError naming the file when the write fails
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
};

}  // namespace moeforge
