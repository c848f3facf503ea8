#include "core/kernels/self_check.h"

#include "core/kernels/kernel_checks.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>

namespace moeforge::kernels {

std::vector<KernelCheck> check_kernels(const torch::Device& device) {
  std::vector<KernelCheck> out;
  for (const auto& r : run_kernel_checks(device, startup_shapes())) {
    double error = 0;
    for (const double e : {r.forward_error, r.gradient_error}) {
      if (!std::isnan(e)) error = std::max(error, e);
    }
    out.push_back({r.kernel, r.ok, error,
                   fmt::format("{} {}{}{}", r.dtype, r.shape, (r.ok || r.detail.empty()) ? "" : ": ", r.ok ? "" : r.detail)});
  }
  return out;
}

std::vector<std::string> agree_and_disable(const std::vector<KernelCheck>& checks, c10::DeviceType device,
                                           const MaxOverRanks& max_over_ranks) {
  std::vector<int64_t> failed(kNumKernels, 0);
  std::vector<std::string> why(kNumKernels);
  for (const auto& c : checks) {
    if (c.ok) continue;
    const auto k = static_cast<size_t>(c.kernel);
    failed[k] = 1;
    if (why[k].empty()) why[k] = fmt::format("its self-check disagrees with the reference (error {:.3g}, {})", c.error, c.detail);
  }
  const auto anywhere = max_over_ranks(failed);
  std::vector<std::string> disabled;
  for (size_t k = 0; k < failed.size(); ++k) {
    if (anywhere.at(k) == 0) continue;
    disable(static_cast<Kernel>(k), device, why[k].empty() ? "its self-check failed on another rank" : why[k]);
    disabled.emplace_back(kernel_name(static_cast<Kernel>(k)));
  }
  return disabled;
}

void self_check(const torch::Device& device, const MaxOverRanks& max_over_ranks) {
  const auto start = std::chrono::steady_clock::now();
  const auto checks = check_kernels(device);
  const auto disabled = agree_and_disable(checks, device.type(), max_over_ranks);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  double worst = 0;
  for (const auto& c : checks) worst = std::max(worst, c.error);
  spdlog::info("kernel self-check on {}: {} checks in {:.0f} ms, worst error {:.2g}{}", device.str(), checks.size(), ms,
               worst, disabled.empty() ? "" : fmt::format("; disabled: {}", fmt::join(disabled, ", ")));
}

}  // namespace moeforge::kernels
