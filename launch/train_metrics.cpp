#include "launch/train_metrics.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>

namespace moeforge {

nlohmann::json step_metrics_json(const StepMetrics& m) {
  nlohmann::json j = {
      {"iteration", m.iteration},
      {"train_iters", m.train_iters},
      {"consumed_samples", m.consumed_samples},
      {"num_micro_batches", m.num_micro_batches},
      {"lm_loss", m.lm_loss},
      {"aux_loss", m.aux_loss},
      {"z_loss", m.z_loss},
      {"loss", m.loss},
      {"lr", m.lr},
      {"grad_norm", m.grad_norm},
      {"skipped", m.skipped},
      {"skipped_iterations", m.skipped_iterations},
      {"expert_load_max_over_mean", m.expert_load_max_over_mean},
      {"expert_load_per_layer", m.expert_load_per_layer},
      {"step_time_s", m.step_time_s},
      {"time_data_s", m.time_data_s},
      {"time_forward_s", m.time_forward_s},
      {"time_backward_s", m.time_backward_s},
      {"time_grad_reduce_s", m.time_grad_reduce_s},
      {"time_optimizer_s", m.time_optimizer_s},
      {"time_pipeline_wait_s", m.time_pipeline_wait_s},
      {"tokens_per_s_per_device", m.tokens_per_s_per_device},
      {"tflops_per_device", m.tflops_per_device},
      {"tflops_6n_per_device", m.tflops_6n_per_device},
      {"mfu", m.mfu},
      {"mfu_6n", m.mfu_6n},
      {"peak_tflops", m.peak_tflops},
      {"peak_source", m.peak_source},
      {"peak_memory_bytes", m.peak_memory_bytes},
      {"timestamp", std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count()},
  };
  // JSON has no NaN or infinity: a non-finite value is written as null (the iteration is skipped).
  for (const char* key : {"lm_loss", "aux_loss", "z_loss", "loss", "grad_norm"}) {
    if (!std::isfinite(j[key].get<double>())) j[key] = nullptr;
  }
  if (!m.ep_tokens_received.empty()) {
    j["ep_tokens_received"] = m.ep_tokens_received;
    j["ep_tokens_received_max_over_mean"] = m.ep_tokens_received_max_over_mean;
    j["all_to_all_bytes_sent"] = m.all_to_all_bytes_sent;
    j["time_all_to_all_s"] = m.time_all_to_all_s;
  }
  if (!m.rank_times.empty()) {
    for (size_t k = 0; k < kRankTimeKeys.size(); ++k) {
      std::vector<double> per_rank;
      for (const auto& r : m.rank_times) per_rank.push_back(r[k]);
      j["rank_times"][kRankTimeKeys[k]] = per_rank;
    }
  }
  if (m.valid_lm_loss) {
    j["valid_lm_loss"] = *m.valid_lm_loss;
    j["valid_ppl"] = std::exp(std::min(*m.valid_lm_loss, 20.0));  // Megatron caps the exponent at 20
  }
  return j;
}

std::string step_log_line(const StepMetrics& m) {
  const int width = static_cast<int>(std::to_string(m.train_iters).size());
  std::string line = fmt::format(
      "iteration {:>{}}/{} | consumed samples: {} | elapsed time per iteration (ms): {:.1f} | tokens/s/device: {:.0f} | "
      "TFLOP/s/device: {:.3f} | MFU: {:.2f}% | MFU(6N): {:.2f}% (peak {:.3g} TFLOP/s, {}) | learning rate: {:.6E} | "
      "lm loss: {:.6E} | aux loss: {:.6E} | ",
      m.iteration, width, m.train_iters, m.consumed_samples, m.step_time_s * 1e3, m.tokens_per_s_per_device,
      m.tflops_per_device, 100 * m.mfu, 100 * m.mfu_6n, m.peak_tflops, m.peak_kind, m.lr, m.lm_loss, m.aux_loss);
  if (m.z_loss != 0) line += fmt::format("z loss: {:.6E} | ", m.z_loss);
  line += fmt::format("grad norm: {:.4f} | skipped iterations: {}", m.grad_norm, m.skipped_iterations);
  if (!m.expert_load_per_layer.empty()) line += fmt::format(" | expert load max/mean: {:.2f}", m.expert_load_max_over_mean);
  if (!m.ep_tokens_received.empty()) {
    line += fmt::format(" | EP tokens received max/mean: {:.2f} | all-to-all (ms): {:.1f}", m.ep_tokens_received_max_over_mean,
                        m.time_all_to_all_s * 1e3);
  }
  if (m.skipped) line += " | SKIPPED (non-finite loss or gradient)";
  return line;
}

}  // namespace moeforge
