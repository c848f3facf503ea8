#include "launch/commands/check_command.h"

#include "core/base/errors.h"
#include "core/config/config.h"
#include "core/device/device_runtime.h"
#include "core/kernels/kernel_checks.h"
#include "core/kernels/wgrad_accumulation.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <set>
#include <vector>

namespace moeforge {

namespace {

constexpr const char* kFailVariable = "MOEFORGE_CHECK_KERNELS_FAIL";

struct Row {
  std::string shapes;  // the shape set: start-up, odd, empty, mission
  kernels::CheckRow check;
};

torch::Device resolve_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name == "cuda") {
#ifndef MOEFORGE_WITH_CUDA
    fail_user("--device cuda: this moeforge was built without CUDA (no nvcc matching the torch wheel's CUDA was found at "
              "configure time), so it has no CUDA kernels. Build it where nvcc is installed (docs/gpu.md), or check the "
              "CPU kernels with --device cpu");
#endif
    const auto gpus = torch::cuda::is_available() ? torch::cuda::device_count() : 0;
    if (gpus == 0) {
      fail_user("--device cuda: no CUDA device is visible to this process (a CUDA build, 0 GPUs). Run it on a GPU "
                "machine (check nvidia-smi and CUDA_VISIBLE_DEVICES), or check the CPU kernels with --device cpu");
    }
    return select_device(c10::DeviceType::CUDA, 0, 1);
  }
  HardwareConfig hardware;  // emulated: the emulator library beside this executable, one device
  hardware.device = name;
  return select_device(training_device_type(hardware, 1), 0, 1);
}

std::vector<torch::ScalarType> dtypes_of(const std::string& dtype) {
  if (dtype == "fp32") return {torch::kFloat32};
  if (dtype == "bf16") return {torch::kBFloat16};
  return {torch::kFloat32, torch::kBFloat16};
}

std::optional<kernels::Kernel> forced_failure(c10::DeviceType device) {
  const char* value = std::getenv(kFailVariable);
  if (value == nullptr || *value == '\0') return std::nullopt;
  const auto kernel = kernels::kernel_from_name(value);
  if (!kernel) {
    fail_user("{}={} names no kernel. Use one of {}, or unset it to run the checks unforced", kFailVariable, value,
              kernels::kernel_names());
  }
  if (!kernels::fused(*kernel, device)) {
    fail_user("{}={}: {} has no fused implementation on {}, so there is nothing to fail. Name a kernel this device "
              "runs fused (the table of `moeforge check kernels --device {}` lists them), or unset it",
              kFailVariable, value, value, c10::DeviceTypeName(device, true), c10::DeviceTypeName(device, true));
  }
  return kernel;
}

// NaN (not compared) and infinity (an exception or a device fault: see detail) print as such.
std::string error_text(double e) { return std::isnan(e) ? "-" : std::isinf(e) ? "inf" : fmt::format("{:.2e}", e); }

nlohmann::json error_json(double e) { return std::isfinite(e) ? nlohmann::json(e) : nlohmann::json(nullptr); }

void print_table(const std::vector<Row>& rows, std::ostream& out) {
  std::vector<std::vector<std::string>> cells{
      {"kernel", "function", "dtype", "shapes", "shape", "forward error", "gradient error", "tolerance", "pass"}};
  for (const auto& r : rows) {
    const auto& c = r.check;
    cells.push_back({kernels::kernel_name(c.kernel), c.op, c.dtype, r.shapes, c.shape, error_text(c.forward_error),
                     error_text(c.gradient_error), fmt::format("{:.0e}", c.tolerance), c.ok ? "pass" : "FAIL"});
  }
  std::vector<size_t> width(cells[0].size(), 0);
  for (const auto& line : cells) {
    for (size_t i = 0; i < line.size(); ++i) width[i] = std::max(width[i], line[i].size());
  }
  for (size_t l = 0; l < cells.size(); ++l) {
    std::string text;
    for (size_t i = 0; i < cells[l].size(); ++i) text += fmt::format("{:<{}}  ", cells[l][i], width[i]);
    out << text.substr(0, text.find_last_not_of(' ') + 1) << "\n";
    // A failed row's detail (the exception, the device's error, the other comparisons) under it.
    if (l > 0 && !rows[l - 1].check.ok && !rows[l - 1].check.detail.empty()) out << "    ^ " << rows[l - 1].check.detail << "\n";
  }
}

}  // namespace

int run_check_kernels(const CheckKernelsOptions& options, std::ostream& out) {
  const auto device = resolve_device(options.device);
  kernels::CheckConfig config;
  config.dtypes = dtypes_of(options.dtype);
  config.perturb = forced_failure(device.type());
  if (config.perturb == kernels::Kernel::adamw && options.dtype == "bf16") {
    fail_user("{}=adamw: --dtype bf16 runs no check of it (AdamW runs in fp32). Use --dtype fp32 or all", kFailVariable);
  }
  if (config.perturb == kernels::Kernel::wgrad_accumulation && options.dtype == "fp32") {
    fail_user("{}=wgrad_accumulation: --dtype fp32 runs no check of it (it fuses bf16 only). Use --dtype bf16 or all",
              kFailVariable);
  }
  // As training does before its self-check: the way this LibTorch adds a bf16 weight gradient into
  // fp32 on the device (the CPU always widens).
  std::string refused;
  if (!device.is_cpu()) refused = kernels::probe_mixed_accumulate(device);
  std::vector<std::string> fused;
  for (int k = 0; k < kernels::kNumKernels; ++k) {
    if (kernels::fused(static_cast<kernels::Kernel>(k), device.type())) fused.emplace_back(kernels::kernel_name(static_cast<kernels::Kernel>(k)));
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<Row> rows;
  for (const auto& shapes : kernels::conformance_shapes()) {
    for (auto& check : kernels::run_kernel_checks(device, shapes, config)) rows.push_back({shapes.name, std::move(check)});
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (config.perturb && std::none_of(rows.begin(), rows.end(), [&](const Row& r) { return r.check.kernel == *config.perturb; })) {
    fail_user("{}={}: --dtype {} runs no check of it (adamw runs in fp32, wgrad_accumulation in bf16). Use --dtype all",
              kFailVariable, kernels::kernel_name(*config.perturb), options.dtype);
  }
  std::set<std::string> failed_set;
  for (const auto& r : rows) {
    if (!r.check.ok) failed_set.insert(kernels::kernel_name(r.check.kernel));
  }
  const std::vector<std::string> failed(failed_set.begin(), failed_set.end());
  const auto failures = std::count_if(rows.begin(), rows.end(), [](const Row& r) { return !r.check.ok; });

  if (options.json) {
    auto checks = nlohmann::json::array();
    for (const auto& r : rows) {
      const auto& c = r.check;
      checks.push_back({{"kernel", kernels::kernel_name(c.kernel)},
                        {"function", c.op},
                        {"dtype", c.dtype},
                        {"shapes", r.shapes},
                        {"shape", c.shape},
                        {"forward_error", error_json(c.forward_error)},
                        {"gradient_error", error_json(c.gradient_error)},
                        {"tolerance", c.tolerance},
                        {"pass", c.ok},
                        {"detail", c.detail}});
    }
    const nlohmann::json j{{"device", device.str()},
                           {"dtypes", options.dtype == "all" ? std::vector<std::string>{"fp32", "bf16"}
                                                             : std::vector<std::string>{options.dtype}},
                           {"fused_kernels", fused},
                           {"mixed_accumulate", kernels::mixed_accumulate_name(kernels::mixed_accumulate_mode())},
                           {"forced_failure", config.perturb ? nlohmann::json(kernels::kernel_name(*config.perturb)) : nlohmann::json(nullptr)},
                           {"checks", checks},
                           {"failed", failed},
                           {"pass", failed.empty()},
                           {"seconds", seconds}};
    out << j.dump(2) << "\n";
  } else if (fused.empty()) {
    out << fmt::format("{} has no fused kernels of its own: every kernel runs its reference (the LibTorch composition) "
                       "there, so there is nothing to check\n",
                       device.str());
  } else {
    out << fmt::format("check kernels on {}: {} checks of {} fused kernels ({}), {} failed, in {:.2f} s{}\n\n", device.str(),
                       rows.size(), fused.size(), fmt::join(fused, ", "), failures, seconds,
                       config.perturb ? fmt::format(" ({} forces {} to fail)", kFailVariable, kernels::kernel_name(*config.perturb))
                                      : "");
    if (!refused.empty()) out << "fused weight gradient: " << refused << "\n\n";
    print_table(rows, out);
  }
  if (!failed.empty()) {
    std::cerr << fmt::format("error: {} of {} kernel checks on {} failed: {} disagree with their references{}. "
                             "Training runs the reference of a kernel whose start-up self-check fails; fix the "
                             "kernel, or train with model.kernels: reference\n",
                             failures, rows.size(), device.str(), fmt::join(failed, ", "),
                             config.perturb ? fmt::format(" (forced by {})", kFailVariable) : "");
    return 1;
  }
  return 0;
}

CLI::App* add_check_kernels_command(CLI::App& check, CheckKernelsOptions& options) {
  auto* cmd = check.add_subcommand(
      "kernels", "Every fused kernel of a device against its reference at odd, empty and the mission's shapes (docs/kernels.md)");
  cmd->add_option("--device", options.device, "cpu, cuda or emulated (default cpu)")
      ->check(CLI::IsMember({"cpu", "cuda", "emulated"}));
  cmd->add_option("--dtype", options.dtype, "fp32, bf16 or all (default all)")->check(CLI::IsMember({"fp32", "bf16", "all"}));
  cmd->add_flag("--json", options.json, "Print one JSON object (keys in docs/kernels.md)");
  return cmd;
}

}  // namespace moeforge
