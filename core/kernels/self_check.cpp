#include "core/kernels/self_check.h"

#include "core/kernels/adamw.h"
#include "core/kernels/cross_entropy.h"
#include "core/kernels/grouped_gemm.h"
#include "core/kernels/moe_permute.h"
#include "core/kernels/rmsnorm.h"
#include "core/kernels/rope.h"
#include "core/kernels/swiglu.h"
#include "core/kernels/wgrad_accumulation.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>

#ifdef MOEFORGE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace moeforge::kernels {

namespace {

using Fn = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

// Both sides read back to the host first: the fused results live on the device, while some
// references (the fp64 sums of check_wgrad) are made on the host, and a device tensor minus a host
// one is an error on every accelerator (it was: the wgrad check then failed on every GPU).
double norm_error(const torch::Tensor& a, const torch::Tensor& b) {
  const auto a64 = a.detach().to(torch::kCPU, torch::kFloat64), b64 = b.detach().to(torch::kCPU, torch::kFloat64);
  const auto d = (a64 - b64).norm().item<double>();
  const auto n = b64.norm().item<double>();
  if (!std::isfinite(d)) return INFINITY;
  return n == 0 ? d : d / n;
}

// The output and the gradients of the first `differentiable` inputs, for the same upstream gradient.
std::vector<torch::Tensor> run(const Fn& f, const std::vector<torch::Tensor>& inputs, size_t differentiable) {
  std::vector<torch::Tensor> leaves;
  for (size_t i = 0; i < inputs.size(); ++i) leaves.push_back(inputs[i].detach().clone().requires_grad_(i < differentiable));
  const auto y = f(leaves);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  y.backward(torch::randn(y.sizes(), gen, torch::kFloat32).to(y.options()));
  std::vector<torch::Tensor> out{y.detach()};
  for (const auto& l : leaves) {
    if (l.requires_grad()) out.push_back(l.grad().defined() ? l.grad() : torch::zeros_like(l));
  }
  return out;
}

// A detector of a broken kernel, not a precision test (tests/unit/test_kernels.cpp is that).
double tolerance(torch::ScalarType t) { return t == torch::kBFloat16 ? 3e-2 : 1e-4; }

struct Case {
  Kernel kernel;
  Fn fused, reference;
  std::vector<torch::Tensor> inputs;  // made on the CPU, moved to the device
  size_t differentiable = SIZE_MAX;   // the inputs that get gradients (rope's tables do not)
  // Whether the fused path runs for these inputs at all (the grouped GEMM: bf16 only on CUDA);
  // empty: always.
  std::function<bool(const std::vector<torch::Tensor>&)> runs = nullptr;
};

torch::Tensor randn(const std::vector<int64_t>& shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  // host: drawn by the CPU generator, the same numbers on every device; callers move them.
  return torch::randn(shape, gen, torch::kFloat32);
}

std::vector<Case> cases(const torch::Device& device) {
  const int64_t T = 24, K = 2, E = 4, D = 32;
  // Slots sorted by expert (expert s mod E, slot 5 dropped), in the kernels' index maps.
  // host: the index maps are built on the host and moved to the device below.
  auto experts_A = torch::arange(T * K, torch::kInt64).remainder(E);
  experts_A[5] = E;
  const auto order_A = std::get<1>(torch::sort(experts_A, /*stable=*/true, 0, false));
  const auto sor = order_A.narrow(0, 0, T * K - 1).contiguous().to(device);
  auto ros = torch::empty({T * K}, torch::kInt64);  // host: moved below
  // host: as above
  ros.index_put_({order_A.narrow(0, 0, T * K - 1)}, torch::arange(T * K - 1, torch::kInt64));
  ros[5] = -1;
  ros = ros.to(device);
  const auto labels = torch::arange(T, torch::kInt64).remainder(13).to(device);
  const auto mask = (torch::arange(T) % 5 != 0).to(torch::kFloat32).to(device);
  const std::vector<int64_t> rows{7, 0, 9, 8};
  const auto offs = group_offsets(rows, device);
  // RoPE's tables as RotaryEmbedding makes them: both halves the same angles.
  const auto half = randn({2, 6, 8}, 3) * 3;
  const auto rope_angles = torch::cat({half, half}, -1);
  return {
      {Kernel::rmsnorm, [](const auto& x) { return rms_norm_fused(x[0], x[1], 1e-6); },
       [](const auto& x) { return rms_norm_reference(x[0], x[1], 1e-6); }, {randn({T, D}, 1), randn({D}, 2)}},
      {Kernel::rope, [](const auto& x) { return rope_fused(x[0], x[1], x[2]); },
       [](const auto& x) { return rope_reference(x[0], x[1], x[2]); },
       {randn({2, 6, 3, 16}, 3), rope_angles.cos(), rope_angles.sin()}, 1},
      {Kernel::swiglu, [](const auto& x) { return swiglu_fused(x[0]); },
       [](const auto& x) { return swiglu_reference(x[0]); }, {randn({T, 2 * 40}, 6)}},
      {Kernel::swiglu, [](const auto& x) { return swiglu_fused(x[0], x[1]); },
       [](const auto& x) { return swiglu_reference(x[0], x[1]); }, {randn({T, 40}, 7), randn({T, 40}, 8)}},
      {Kernel::permute, [=](const auto& x) { return moe_permute_fused(x[0], sor, ros, K); },
       [=](const auto& x) { return moe_permute_reference(x[0], sor, K); }, {randn({T, D}, 9)}},
      {Kernel::permute, [=](const auto& x) { return moe_combine_fused(x[0], sor, ros, x[1]); },
       [=](const auto& x) { return moe_combine_reference(x[0], ros, x[1]); }, {randn({T * K - 1, D}, 10), randn({T, K}, 11)}},
      {Kernel::cross_entropy, [=](const auto& x) { return lm_head_cross_entropy_fused(x[0], x[1], labels, mask, 5); },
       [=](const auto& x) { return lm_head_cross_entropy_reference(x[0], x[1], labels, mask); },
       {randn({T, D}, 12), randn({50, D}, 13)}},
      {Kernel::grouped_gemm, [=](const auto& x) { return grouped_mm(x[0], x[1].transpose(1, 2), offs); },
       [=](const auto& x) {
         std::vector<torch::Tensor> out;
         for (int64_t e = 0, at = 0; e < E; at += rows[static_cast<size_t>(e)], ++e) {
           out.push_back(torch::matmul(x[0].narrow(0, at, rows[static_cast<size_t>(e)]), x[1][e].t()));
         }
         return torch::cat(out);
       },
       {randn({T, D}, 14), randn({E, D, D}, 15)},
       SIZE_MAX,
       [=](const auto& x) { return grouped_mm_usable(x[0], {D, D}); }},
  };
}

// AdamW has no autograd: three steps over two tensors (one with a bf16 copy), then w, the moments
// and the copy compared.
KernelCheck check_adamw(const torch::Device& device) {
  auto make = [&](int64_t n, bool copy, uint64_t seed) {
    return AdamWTensors{randn({n}, seed).to(device), (randn({n}, seed + 1) * 0.1).to(device),
                        (randn({n}, seed + 2) * 0.01).to(device), (randn({n}, seed + 3).square() * 1e-3).to(device),
                        copy ? torch::zeros({n}, torch::TensorOptions(torch::kBFloat16).device(device)) : torch::Tensor(),
                        copy};
  };
  std::vector<AdamWTensors> a{make(1000, false, 20), make(37, true, 30)}, b;
  for (const auto& t : a) {
    b.push_back({t.w.clone(), t.g.clone(), t.exp_avg.clone(), t.exp_avg_sq.clone(),
                 t.copy.defined() ? t.copy.clone() : torch::Tensor(), t.decay});
  }
  for (int64_t step = 1; step <= 3; ++step) {
    const AdamWHyper h{1e-3, 0.9, 0.95, 1e-8, 0.1, step};
    adamw_step_fused(a, h);
    adamw_step_reference(b, h);
  }
  KernelCheck c{Kernel::adamw, true, 0, "fp32 [1000] and [37] with a bf16 copy, 3 steps"};
  for (size_t i = 0; i < a.size(); ++i) {
    for (const auto& [x, y] : {std::pair{a[i].w, b[i].w}, {a[i].exp_avg, b[i].exp_avg}, {a[i].exp_avg_sq, b[i].exp_avg_sq}}) {
      c.error = std::max(c.error, norm_error(x, y));
    }
    if (a[i].copy.defined()) c.error = std::max(c.error, norm_error(a[i].copy, b[i].copy) / 10);  // bf16 rounding
  }
  c.ok = c.error <= tolerance(torch::kFloat32);
  return c;
}

// The fused weight gradient: two micro-batches through linear and grouped_linear (an expert with
// no rows) with bf16 weights attached to fp32 accumulators, against the fp64 sums of the unrounded
// products; the input gradients against the fp32 composition.
KernelCheck check_wgrad(const torch::Device& device) {
  const auto bf16_options = torch::TensorOptions(torch::kBFloat16).device(device);
  const auto fp32_options = bf16_options.dtype(torch::kFloat32);
  const int64_t M = 24, J = 32, E = 4, F = 16;
  const auto w = randn({M, J}, 40).to(bf16_options).requires_grad_(true);
  const auto w_EFJ = randn({E, F, J}, 41).to(bf16_options).requires_grad_(true);
  const auto main_grad = torch::zeros({M, J}, fp32_options), main_grad_E = torch::zeros({E, F, J}, fp32_options);
  int added = 0;
  const char owner = 0;
  struct Detach {
    const torch::Tensor &a, &b;
    const void* owner;
    ~Detach() {
      detach_main_grad(a, owner);
      detach_main_grad(b, owner);
    }
  } detach{w, w_EFJ, &owner};
  attach_main_grad(w, main_grad, [&] { ++added; }, &owner);
  attach_main_grad(w_EFJ, main_grad_E, [&] { ++added; }, &owner);
  const std::vector<int64_t> rows{7, 0, 9, 8};
  const auto offs = group_offsets(rows, device);
  // host: the fp64 references, summed from host copies; norm_error compares on the host.
  auto reference = torch::zeros({M, J}, torch::kFloat64), reference_E = torch::zeros({E, F, J}, torch::kFloat64);
  double dgrad_error = 0;
  const bool grouped = grouped_mm_usable(torch::empty({0}, bf16_options), {F, J});
  torch::AutoGradMode grad_mode(true);
  for (uint64_t mb = 0; mb < 2; ++mb) {
    const auto x = randn({3, 8, J}, 50 + mb).to(bf16_options).requires_grad_(true), g = randn({3, 8, M}, 60 + mb).to(bf16_options);
    kernels::linear(x, w).backward(g);
    reference += g.reshape({-1, M}).cpu().to(torch::kFloat64).t().mm(x.reshape({-1, J}).detach().cpu().to(torch::kFloat64));
    dgrad_error = std::max(dgrad_error, norm_error(x.grad(), g.to(torch::kFloat32).matmul(w.detach().to(torch::kFloat32))));
    const auto x_NJ = randn({24, J}, 70 + mb).to(bf16_options), g_NF = randn({24, F}, 80 + mb).to(bf16_options);
    if (!grouped) continue;  // the experts run their loop here, with ordinary gradients
    kernels::grouped_linear(x_NJ, w_EFJ, offs, rows).backward(g_NF);
    for (int64_t e = 0, at = 0; e < E; at += rows[static_cast<size_t>(e)], ++e) {
      const auto n = rows[static_cast<size_t>(e)];
      reference_E[e] += g_NF.narrow(0, at, n).cpu().to(torch::kFloat64).t().mm(x_NJ.narrow(0, at, n).cpu().to(torch::kFloat64));
    }
  }
  KernelCheck c{Kernel::wgrad_accumulation, true, 0, "bf16 [24, 32] and [4, 16, 32] into fp32_options, 2 micro-batches"};
  c.error = std::max(norm_error(main_grad, reference), norm_error(main_grad_E, reference_E));
  c.ok = c.error <= tolerance(torch::kFloat32) && dgrad_error <= tolerance(torch::kBFloat16) && added == (grouped ? 4 : 2) &&
         !w.grad().defined() && !w_EFJ.grad().defined();
  if (!grouped) c.detail = "bf16 [24, 32] into fp32_options, 2 micro-batches";
  if (!c.ok) c.detail += fmt::format(" (input gradient error {:.3g}, {} additions reported)", dgrad_error, added);
  return c;
}

// A CUDA kernel's fault (an illegal address, say) is reported by whichever later call waits for it,
// and outlives the check that caused it: the device is synchronised after each check, so a fault is
// that kernel's. A fault that cudaGetLastError clears fails the check (the kernel runs its
// reference). A sticky one (the next synchronisation fails again) has corrupted the CUDA context,
// in which nothing can run any more, the reference neither: it stops the process, naming the kernel.
#ifdef MOEFORGE_WITH_CUDA
struct DeviceFault {
  std::string error;
  bool sticky = false;
};

std::optional<DeviceFault> device_fault(const torch::Device& device) {
  const c10::cuda::CUDAGuard on_device(device);
  const cudaError_t synced = cudaDeviceSynchronize();
  const cudaError_t last = cudaGetLastError();  // clears an error that is not sticky
  const cudaError_t error = synced != cudaSuccess ? synced : last;
  if (error == cudaSuccess) return std::nullopt;
  const bool sticky = cudaDeviceSynchronize() != cudaSuccess;
  static_cast<void>(cudaGetLastError());
  return DeviceFault{fmt::format("{} ({})", cudaGetErrorString(error), cudaGetErrorName(error)), sticky};
}
#endif

void check_device_after(const torch::Device& device, KernelCheck& check) {
#ifdef MOEFORGE_WITH_CUDA
  if (!device.is_cuda()) return;
  const auto fault = device_fault(device);
  if (!fault) return;
  if (fault->sticky) {
    throw std::runtime_error(fmt::format(
        "kernel self-check on {}: the check of {} ({}) left a sticky CUDA error: {}. It corrupts the CUDA context "
        "(no later CUDA call of this process can succeed, the reference path's neither), so the run stops here. "
        "Rerun with model.kernels: reference to train without the fused kernels, and report the kernel",
        device.str(), kernel_name(check.kernel), check.detail, fault->error));
  }
  check.ok = false;
  check.error = INFINITY;
  check.detail += fmt::format("; the device reported a CUDA error after it: {}", fault->error);
#else
  static_cast<void>(device);
  static_cast<void>(check);
#endif
}

std::string shapes_of(const std::vector<torch::Tensor>& inputs) {
  std::vector<std::string> s;
  for (const auto& x : inputs) s.push_back(fmt::format("[{}]", fmt::join(x.sizes(), ", ")));
  return fmt::format("{}", fmt::join(s, " "));
}

}  // namespace

std::vector<KernelCheck> check_kernels(const torch::Device& device) {
  std::vector<KernelCheck> out;
  auto guarded = [&](Kernel k, const std::string& what, const std::function<KernelCheck()>& f) {
    try {
      out.push_back(f());
    } catch (const std::exception& e) {
      out.push_back({k, false, INFINITY, fmt::format("{}: {}", what, e.what())});
    }
    check_device_after(device, out.back());  // on CUDA: a fault is this kernel's (above)
  };
  for (auto& c : cases(device)) {
    if (!fused(c.kernel, device.type())) continue;
    for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      std::vector<torch::Tensor> inputs;
      for (const auto& x : c.inputs) inputs.push_back(x.to(device, dtype));
      const auto what = fmt::format("{} {}", c10::toString(dtype), shapes_of(inputs));
      if (c.runs && !c.runs(inputs)) continue;  // the model runs the reference here too
      guarded(c.kernel, what, [&] {
        const auto a = run(c.fused, inputs, c.differentiable), b = run(c.reference, inputs, c.differentiable);
        KernelCheck r{c.kernel, true, 0, what};
        for (size_t i = 0; i < a.size() && i < b.size(); ++i) r.error = std::max(r.error, norm_error(a[i], b[i]));
        r.ok = a.size() == b.size() && r.error <= tolerance(dtype);
        return r;
      });
    }
  }
  if (fused(Kernel::adamw, device.type())) guarded(Kernel::adamw, "fp32", [&] { return check_adamw(device); });
  if (fused(Kernel::wgrad_accumulation, device.type())) {
    guarded(Kernel::wgrad_accumulation, "bf16", [&] { return check_wgrad(device); });
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
