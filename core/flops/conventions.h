// defines: MfuConvention, mfu_conventions, planned_peak_source
//
// The MFU conventions moeforge reports side by side, each with its formula in one line, so a row
// and `moeforge plan` name how every number was counted (chip evaluators compare numbers that
// differ by up to a third on Qwen1.5-MoE-A2.7B only because of the convention). Free of LibTorch:
// the plan includes it.
#pragma once

#include "core/config/config.h"

#include <string>
#include <vector>

namespace moeforge {

struct MfuConvention {
  std::string key;      // report.json's result.mfu.<key> and plan --json's flops.per_step.<key>
  std::string name;     // how rows and tables label it
  std::string formula;  // one line
};

// megatron, megatron_legacy, six_n, torchtitan, hardware (the HFU), in that order.
const std::vector<MfuConvention>& mfu_conventions();

// Where a run of this config will take its peak from, without measuring anything (the plan runs on
// a login node): "hardware.peak_tflops = 312", "chip table (A800): 312 TFLOP/s", or the start-up
// calibration or GPU detection that only the run can do.
std::string planned_peak_source(const HardwareConfig& hardware);

}  // namespace moeforge
