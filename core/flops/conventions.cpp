#include "core/flops/conventions.h"

#include "core/flops/mfu.h"

#include <fmt/format.h>

namespace moeforge {

const std::vector<MfuConvention>& mfu_conventions() {
  static const std::vector<MfuConvention> all = {
      {"megatron", "MFU (Megatron)",
       "tokens x 6 x (MACs per token of every weight matrix, routed experts at top-k) + 6 x batch x s^2 x heads x head_dim "
       "x layers (causal attention at half); over step time x devices x peak"},
      {"megatron_legacy", "MFU (Megatron legacy)",
       "as Megatron, with the attention term not halved: 12 x batch x s^2 x heads x head_dim x layers (Megatron before "
       "March 2025)"},
      {"six_n", "MFU (6N, FlagPerf)",
       "tokens x 6 x N, N = layers x (attention matmuls + 3 x hidden x activated FFN width) + vocab x hidden (no norms, "
       "router, gate or input embedding)"},
      {"torchtitan", "MFU (torchtitan)",
       "tokens x (6 x (N - N_embedding) + 12 x layers x heads x head_dim x s), N = ACTIVE parameters (routed experts x "
       "top-k / E; router, shared expert, norms and output layer counted), N_embedding = the input embedding"},
      {"hardware", "HFU (recomputation counted)",
       "Megatron's FLOPs + the recomputed forward (full: every decoder layer's forward; selective: 2 x batch x s^2 x "
       "heads x head_dim x layers); equals MFU (Megatron) without recomputation"},
  };
  return all;
}

std::string planned_peak_source(const HardwareConfig& hw) {
  if (hw.peak_tflops) return fmt::format("hardware.peak_tflops = {:g} TFLOP/s", *hw.peak_tflops);
  if (!hw.chip.empty()) {
    if (const auto t = known_chip_peak_tflops(hw.chip)) return fmt::format("chip table ({}): {:g} TFLOP/s", hw.chip, *t);
  }
  if (hw.device == "cuda") return "the chip table, by the GPU's name at start-up (the run fails if it is not listed)";
  return "calibrated at start-up (a CPU matmul in the training dtype); the run's log and report give the number";
}

}  // namespace moeforge
