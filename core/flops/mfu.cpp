#include "core/flops/mfu.h"

#include "core/base/errors.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <utility>

#ifdef MOEFORGE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace moeforge {

namespace {
// Vendor dense (no sparsity) bf16 tensor-core peaks, TFLOP/s. More specific names first: the
// first entry contained in the chip's name wins.
constexpr std::array<std::pair<std::string_view, double>, 17> kChips{{
    {"GH200", 989},  {"H100 PCIE", 756}, {"H100", 989},  {"H800", 989},  {"H200", 989},   {"H20", 148},
    {"GB200", 2500}, {"B200", 2250},     {"B100", 1750}, {"A100", 312},  {"A800", 312},   {"L40S", 362},
    {"V100", 125},   {"MI325X", 1307},   {"MI300X", 1307}, {"MI250X", 383}, {"910B", 376},
}};

std::string upper(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return out;
}
}  // namespace

std::optional<double> known_chip_peak_tflops(std::string_view chip) {
  const auto name = upper(chip);
  for (const auto& [key, tflops] : kChips) {
    if (name.find(key) != std::string::npos) return tflops;
  }
  return std::nullopt;
}

double calibrate_cpu_peak_tflops(torch::ScalarType dtype, int64_t n, int reps) {
  torch::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  const auto a = torch::randn({n, n}, gen, torch::TensorOptions().dtype(torch::kFloat32)).to(dtype);
  const auto b = torch::randn({n, n}, gen, torch::TensorOptions().dtype(torch::kFloat32)).to(dtype);
  auto c = torch::mm(a, b);  // warm-up: thread pool, packing buffers
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    torch::mm_out(c, a, b);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * static_cast<double>(n * n * n) / s / 1e12);
  }
  return best;
}

std::string cuda_device_name(int index) {
#ifdef MOEFORGE_WITH_CUDA
  if (torch::cuda::is_available() && index < static_cast<int>(torch::cuda::device_count())) {
    return at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(index))->name;
  }
#else
  (void)index;
#endif
  return {};
}

PeakFlops resolve_peak(const HardwareConfig& hw, bool bf16) {
  if (hw.peak_tflops) return {*hw.peak_tflops, "config", "hardware.peak_tflops"};
  const std::string chip = hw.chip.empty() && hw.device == "cuda" ? cuda_device_name(0) : hw.chip;
  // The emulated accelerator runs the host's CPU kernels: its peak is the host's, calibrated.
  const bool host_kernels = hw.device == "cpu" || hw.device == "emulated";
  if (!chip.empty()) {
    if (const auto t = known_chip_peak_tflops(chip)) return {*t, "chip table", fmt::format("chip table ({})", chip)};
    if (!host_kernels) {
      fail_user("hardware.chip '{}' is not in the table of known chips: set hardware.peak_tflops to its dense "
                "{} peak per device",
                chip, bf16 ? "bf16" : "fp32");
    }
  }
  if (!host_kernels) {
    fail_user("MFU needs the device's peak: set hardware.chip (e.g. H100) or hardware.peak_tflops");
  }
  const auto dtype = bf16 ? torch::kBFloat16 : torch::kFloat32;
  const double t = calibrate_cpu_peak_tflops(dtype);
  return {t, "calibrated", fmt::format("calibrated ({} 2048^3 matmul, {} threads)", bf16 ? "bf16" : "fp32", torch::get_num_threads())};
}

}  // namespace moeforge
