#include "core/kernels/kernels.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <array>
#include <atomic>
#include <mutex>
#include <vector>

namespace moeforge::kernels {

namespace {

constexpr std::array<const char*, kNumKernels> kNames{"rmsnorm", "rope",   "swiglu",      "permute",
                                                      "cross_entropy", "adamw", "grouped_gemm", "wgrad_accumulation"};

// Which kernels have an implementation for the CPU, for CUDA (a CUDA build), and for any other
// accelerator (a backend library's, the emulated device's): there only what is itself a LibTorch
// composition runs, the fused weight-gradient accumulation (addmm into main_grad) and the grouped
// GEMM (at::_grouped_mm); the rest take their references.
struct Implemented {
  bool cpu = false, cuda = false, other = false;
};
constexpr Implemented kImplemented[kNumKernels] = {
    /*rmsnorm*/ {true, MOEFORGE_KERNELS_CUDA, false},
    /*rope*/ {true, MOEFORGE_KERNELS_CUDA, false},
    /*swiglu*/ {true, MOEFORGE_KERNELS_CUDA, false},
    /*permute*/ {true, MOEFORGE_KERNELS_CUDA, false},
    /*cross_entropy*/ {true, MOEFORGE_KERNELS_CUDA, false},
    /*adamw*/ {true, MOEFORGE_KERNELS_CUDA, false},
    /*grouped_gemm*/ {true, MOEFORGE_KERNELS_CUDA, true},
    /*wgrad_accumulation*/ {true, MOEFORGE_KERNELS_CUDA, true},
};

size_t column(c10::DeviceType device) {
  return device == c10::DeviceType::CPU ? 0 : device == c10::DeviceType::CUDA ? 1 : 2;
}

// The CPU kernels are compiled for AVX2 and FMA: a CPU without them runs the references.
bool cpu_supports_kernels() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

std::atomic<KernelChoice> g_choice{KernelChoice::fused};
std::array<std::array<std::atomic<bool>, 3>, kNumKernels> g_disabled{};  // [kernel][cpu, cuda, other]

}  // namespace

const char* kernel_name(Kernel k) { return kNames[static_cast<size_t>(k)]; }

void set_choice(KernelChoice c) { g_choice = c; }
KernelChoice choice() { return g_choice; }

bool fused(Kernel k, c10::DeviceType device) {
  if (g_choice.load() != KernelChoice::fused) return false;
  const auto i = static_cast<size_t>(k);
  if (g_disabled[i][column(device)]) return false;
  if (device == c10::DeviceType::CPU) return kImplemented[i].cpu && cpu_supports_kernels();
  if (device == c10::DeviceType::CUDA) return kImplemented[i].cuda;
  return kImplemented[i].other;
}

void disable(Kernel k, c10::DeviceType device, const std::string& why) {
  auto& flag = g_disabled[static_cast<size_t>(k)][column(device)];
  if (!flag.exchange(true)) {
    spdlog::warn("kernel {} on {}: {}; its reference (the LibTorch composition) runs from now on", kernel_name(k),
                 c10::DeviceTypeName(device, true), why);
  }
}

std::string describe_kernels() {
  if (g_choice.load() == KernelChoice::reference) return "reference (model.kernels: reference)";
  std::vector<std::string> fused_list, reference_list;
  for (int i = 0; i < kNumKernels; ++i) {
    const auto k = static_cast<Kernel>(i);
    std::vector<std::string> on;
    if (fused(k, c10::DeviceType::CPU)) on.emplace_back("cpu");
    if (fused(k, c10::DeviceType::CUDA)) on.emplace_back("cuda");
    (on.empty() ? reference_list : fused_list)
        .push_back(on.empty() ? kNames[static_cast<size_t>(i)] : fmt::format("{} ({})", kNames[static_cast<size_t>(i)], fmt::join(on, ", ")));
  }
  return fmt::format("fused: {}; reference: {}", fused_list.empty() ? "none" : fmt::format("{}", fmt::join(fused_list, ", ")),
                     reference_list.empty() ? "none" : fmt::format("{}", fmt::join(reference_list, ", ")));
}

}  // namespace moeforge::kernels
