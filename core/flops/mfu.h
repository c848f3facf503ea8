// defines: PeakFlops, known_chip_peak_tflops, calibrate_cpu_peak_tflops, cuda_device_name, resolve_peak
//
// The peak an MFU is measured against. In order: hardware.peak_tflops as given; else the dense
// bf16 peak of a known chip named by hardware.chip (table in docs/training.md); else, on CPU, a
// calibration run at start-up: the best of a few large matrix products in the training dtype
// with this process's thread count, reported as "calibrated" so nobody mistakes it for a
// vendor figure.
#pragma once

#include "core/config/config.h"

#include <torch/torch.h>

#include <optional>
#include <string>
#include <string_view>

namespace moeforge {

struct PeakFlops {
  double tflops = 0;
  std::string kind;    // "config", "chip table" or "calibrated": what every log line says
  std::string source;  // "hardware.peak_tflops", "chip table (H100)", "calibrated (fp32 2048^3 matmul, 2 threads)"
};

// Dense bf16 peak TFLOP/s of a chip by name, case-insensitive, matched inside longer names
// ("NVIDIA H100 80GB HBM3" is an H100); nullopt when unknown.
std::optional<double> known_chip_peak_tflops(std::string_view chip);

// Best TFLOP/s of `reps` n x n x n matrix products of `dtype` on the CPU.
double calibrate_cpu_peak_tflops(torch::ScalarType dtype, int64_t n = 2048, int reps = 5);

// The name of CUDA device `index` as the driver reports it ("NVIDIA H100 80GB HBM3"); empty in a
// CPU-only build or without a GPU.
std::string cuda_device_name(int index);

// On a GPU, an empty hardware.chip is detected from the device name. Throws UserError on a GPU
// run with neither hardware.peak_tflops nor a known chip.
PeakFlops resolve_peak(const HardwareConfig& hardware, bool bf16);

}  // namespace moeforge
