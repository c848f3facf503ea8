// defines: Kernel, kernel_name, set_choice, fused, disable, describe_kernels
//
// The kernel layer (model.kernels): our own fused kernels, each a custom autograd function with one
// math and two implementations, the CPU (AVX2 + FMA, ATen's vectorized types and parallel_for) and
// CUDA (.cu files over raw pointers and a stream), fp32 and bf16 with fp32 accumulation. Beside
// each sits its reference, the LibTorch composition it replaces: `model.kernels: reference` runs
// those everywhere, and they are the tests' oracle.
//
// Which path runs is decided per kernel and device: `fused` chosen, an implementation for that
// device (the CPU kernels need AVX2 and FMA at run time; the CUDA ones a CUDA build), and not
// disabled. A CUDA kernel is disabled when its self-check at start-up disagrees with its reference
// (kernels/self_check.h), on every rank alike.
#pragma once

#include "core/config/config.h"

#include <c10/core/DeviceType.h>

#include <string>

namespace moeforge::kernels {

enum class Kernel { rmsnorm, rope, swiglu, permute, cross_entropy, adamw, grouped_gemm, wgrad_accumulation };
inline constexpr int kNumKernels = 8;
const char* kernel_name(Kernel kernel);

// model.kernels, applied once at start-up (the default is fused).
void set_choice(KernelChoice choice);
KernelChoice choice();

// Whether `kernel` runs fused on `device`.
bool fused(Kernel kernel, c10::DeviceType device);
// From now on `kernel` runs its reference on `device`; `why` is logged once.
void disable(Kernel kernel, c10::DeviceType device, const std::string& why);

// "fused: swiglu (cpu, cuda), ...; reference: ..." for `moeforge version` and the start-up table.
std::string describe_kernels();

}  // namespace moeforge::kernels
