#include "core/kernels/kernel_checks.h"

#include "core/kernels/adamw.h"
#include "core/kernels/cross_entropy.h"
#include "core/kernels/grouped_gemm.h"
#include "core/kernels/moe_permute.h"
#include "core/kernels/rmsnorm.h"
#include "core/kernels/rope.h"
#include "core/kernels/swiglu.h"
#include "core/kernels/wgrad_accumulation.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <optional>
#include <stdexcept>

#ifdef MOEFORGE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace moeforge::kernels {

namespace {

using Fn = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

// The forced failure's factor: far outside either tolerance, and it reaches the gradients too.
constexpr double kPerturbation = 1.5;

// Both sides read back to the host first: the fused results live on the device, while some
// references (the fp64 sums of check_wgrad) are made on the host, and a device tensor minus a host
// one is an error on every accelerator (it was: the wgrad check then failed on every GPU).
// Where both sides are NaN they agree: a mean over no tokens is 0/0 in the kernel and the
// reference alike (the cross-entropy of zero rows); a NaN on one side only is an infinite error.
double norm_error(const torch::Tensor& a, const torch::Tensor& b) {
  auto a64 = a.detach().to(torch::kCPU, torch::kFloat64), b64 = b.detach().to(torch::kCPU, torch::kFloat64);
  if (a64.sizes() == b64.sizes()) {
    const auto both_nan = a64.isnan().logical_and(b64.isnan());
    a64 = a64.masked_fill(both_nan, 0);
    b64 = b64.masked_fill(both_nan, 0);
  }
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

struct Case {
  Kernel kernel;
  std::string op;
  Fn fused, reference;
  std::vector<torch::Tensor> inputs;  // made on the CPU, moved to the device
  size_t differentiable = SIZE_MAX;   // the inputs that get gradients (rope's tables do not)
  // Whether the fused path runs for these inputs at all (the grouped GEMM: where the probe allows);
  // empty: always.
  std::function<bool(const std::vector<torch::Tensor>&)> runs = nullptr;
};

torch::Tensor randn(const std::vector<int64_t>& shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  // host: drawn by the CPU generator, the same numbers on every device; callers move them.
  return torch::randn(shape, gen, torch::kFloat32);
}

std::string shapes_of(const std::vector<torch::Tensor>& inputs) {
  std::vector<std::string> s;
  for (const auto& x : inputs) s.push_back(fmt::format("[{}]", fmt::join(x.sizes(), ", ")));
  return fmt::format("{}", fmt::join(s, " "));
}

std::string dtype_name(torch::ScalarType t) { return t == torch::kBFloat16 ? "bf16" : "fp32"; }

std::vector<Case> cases(const torch::Device& device, const CheckShapes& s) {
  const int64_t T = s.tokens, K = s.top_k, E = s.experts, D = s.hidden, A = T * K;
  // Slots sorted by expert (expert a mod E; slot 5 dropped where there is one), in the kernels' index maps.
  // host: the index maps are built on the host and moved to the device below.
  auto experts_A = torch::arange(A, torch::kInt64).remainder(E);
  const bool drop = A > 5;
  if (drop) experts_A[5] = E;
  const int64_t kept = A - (drop ? 1 : 0);
  const auto order_A = std::get<1>(torch::sort(experts_A, /*stable=*/true, 0, false));
  const auto sor = order_A.narrow(0, 0, kept).contiguous().to(device);
  auto ros = torch::empty({A}, torch::kInt64);  // host: moved below
  // host: as above
  ros.index_put_({order_A.narrow(0, 0, kept)}, torch::arange(kept, torch::kInt64));
  if (drop) ros[5] = -1;
  ros = ros.to(device);
  const auto labels = torch::arange(T, torch::kInt64).remainder(std::min<int64_t>(13, s.vocab)).to(device);
  const auto mask = (torch::arange(T) % 5 != 0).to(torch::kFloat32).to(device);
  const auto rows = s.gemm_rows;
  const auto offs = group_offsets(rows, device);
  const auto G = static_cast<int64_t>(rows.size());
  const int64_t gemm_N = std::accumulate(rows.begin(), rows.end(), int64_t{0});
  // RoPE's tables as RotaryEmbedding makes them: both halves the same angles.
  const auto& r = s.rope_BSHD;
  const auto half = randn({r[0], r[1], r[3] / 2}, 3) * 3;
  const auto rope_angles = torch::cat({half, half}, -1);
  const int64_t chunk = s.ce_chunk, gemm_out = s.gemm_out;
  return {
      {Kernel::rmsnorm, "rms_norm", [](const auto& x) { return rms_norm_fused(x[0], x[1], 1e-6); },
       [](const auto& x) { return rms_norm_reference(x[0], x[1], 1e-6); }, {randn({T, D}, 1), randn({D}, 2)}},
      {Kernel::rope, "rope", [](const auto& x) { return rope_fused(x[0], x[1], x[2]); },
       [](const auto& x) { return rope_reference(x[0], x[1], x[2]); },
       {randn(r, 3), rope_angles.cos(), rope_angles.sin()}, 1},
      {Kernel::swiglu, "swiglu(gate_up)", [](const auto& x) { return swiglu_fused(x[0]); },
       [](const auto& x) { return swiglu_reference(x[0]); }, {randn({T, 2 * s.ffn}, 6)}},
      {Kernel::swiglu, "swiglu(gate, up)", [](const auto& x) { return swiglu_fused(x[0], x[1]); },
       [](const auto& x) { return swiglu_reference(x[0], x[1]); }, {randn({T, s.shared_ffn}, 7), randn({T, s.shared_ffn}, 8)}},
      {Kernel::permute, "moe_permute", [=](const auto& x) { return moe_permute_fused(x[0], sor, ros, K); },
       [=](const auto& x) { return moe_permute_reference(x[0], sor, K); }, {randn({T, D}, 9)}},
      {Kernel::permute, "moe_combine", [=](const auto& x) { return moe_combine_fused(x[0], sor, ros, x[1]); },
       [=](const auto& x) { return moe_combine_reference(x[0], ros, x[1]); }, {randn({kept, D}, 10), randn({T, K}, 11)}},
      {Kernel::cross_entropy, "lm_head_cross_entropy",
       [=](const auto& x) { return lm_head_cross_entropy_fused(x[0], x[1], labels, mask, chunk); },
       [=](const auto& x) { return lm_head_cross_entropy_reference(x[0], x[1], labels, mask); },
       {randn({T, s.head_hidden}, 12), randn({s.vocab, s.head_hidden}, 13)}},
      {Kernel::grouped_gemm, "grouped_mm", [=](const auto& x) { return grouped_mm(x[0], x[1].transpose(1, 2), offs); },
       [=](const auto& x) {
         std::vector<torch::Tensor> out;
         for (int64_t e = 0, at = 0; e < G; at += rows[static_cast<size_t>(e)], ++e) {
           out.push_back(torch::matmul(x[0].narrow(0, at, rows[static_cast<size_t>(e)]), x[1][e].t()));
         }
         return torch::cat(out);
       },
       {randn({gemm_N, D}, 14), randn({G, gemm_out, D}, 15)},
       SIZE_MAX,
       [=](const auto& x) { return grouped_mm_usable(x[0], {D, gemm_out}); }},
  };
}

// AdamW has no autograd: three steps over the tensors (the last with a bf16 copy and decay), then
// w, the moments and the copy compared.
CheckRow check_adamw(const torch::Device& device, const CheckShapes& s, const std::string& shape, bool perturb) {
  auto make = [&](int64_t n, bool copy, uint64_t seed) {
    return AdamWTensors{randn({n}, seed).to(device), (randn({n}, seed + 1) * 0.1).to(device),
                        (randn({n}, seed + 2) * 0.01).to(device), (randn({n}, seed + 3).square() * 1e-3).to(device),
                        copy ? torch::zeros({n}, torch::TensorOptions(torch::kBFloat16).device(device)) : torch::Tensor(),
                        copy};
  };
  std::vector<AdamWTensors> a, b;
  for (size_t i = 0; i < s.adamw_sizes.size(); ++i) a.push_back(make(s.adamw_sizes[i], i + 1 == s.adamw_sizes.size(), 20 + 10 * i));
  for (const auto& t : a) {
    b.push_back({t.w.clone(), t.g.clone(), t.exp_avg.clone(), t.exp_avg_sq.clone(),
                 t.copy.defined() ? t.copy.clone() : torch::Tensor(), t.decay});
  }
  for (int64_t step = 1; step <= 3; ++step) {
    const AdamWHyper h{1e-3, 0.9, 0.95, 1e-8, 0.1, step};
    adamw_step_fused(a, h);
    adamw_step_reference(b, h);
  }
  if (perturb) a.back().w.mul_(kPerturbation);
  CheckRow c{Kernel::adamw, "adamw_step", "fp32", shape, 0, NAN,
             check_tolerance(torch::kFloat32), true,
             "3 steps; the last tensor has a bf16 copy (its error / 10: bf16 rounding); no gradients (no autograd)"};
  for (size_t i = 0; i < a.size(); ++i) {
    for (const auto& [x, y] : {std::pair{a[i].w, b[i].w}, {a[i].exp_avg, b[i].exp_avg}, {a[i].exp_avg_sq, b[i].exp_avg_sq}}) {
      c.forward_error = std::max(c.forward_error, norm_error(x, y));
    }
    if (a[i].copy.defined()) c.forward_error = std::max(c.forward_error, norm_error(a[i].copy, b[i].copy) / 10);
  }
  c.ok = c.forward_error <= c.tolerance;
  return c;
}

// The fused weight gradient: two micro-batches through linear and grouped_linear (the grouped
// GEMM's experts, some without rows) with bf16 weights attached to fp32 accumulators, against the
// fp64 sums of the unrounded products; the input gradients against the fp32 composition.
CheckRow check_wgrad(const torch::Device& device, const CheckShapes& s, bool perturb) {
  const auto bf16_options = torch::TensorOptions(torch::kBFloat16).device(device);
  const auto fp32_options = bf16_options.dtype(torch::kFloat32);
  const auto& rows = s.gemm_rows;
  const int64_t M = s.wgrad_out, J = s.hidden, E = static_cast<int64_t>(rows.size()), F = s.wgrad_expert_out;
  const int64_t N = std::accumulate(rows.begin(), rows.end(), int64_t{0});
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
  const auto offs = group_offsets(rows, device);
  // host: the fp64 references, summed from host copies; norm_error compares on the host.
  auto reference = torch::zeros({M, J}, torch::kFloat64), reference_E = torch::zeros({E, F, J}, torch::kFloat64);
  double dgrad_error = 0;
  const bool grouped = grouped_mm_usable(torch::empty({0}, bf16_options), {F, J});
  torch::AutoGradMode grad_mode(true);
  for (uint64_t mb = 0; mb < 2; ++mb) {
    const auto x = randn({1, s.wgrad_rows, J}, 50 + mb).to(bf16_options).requires_grad_(true);
    const auto g = randn({1, s.wgrad_rows, M}, 60 + mb).to(bf16_options);
    kernels::linear(x, w).backward(g);
    reference += g.reshape({-1, M}).cpu().to(torch::kFloat64).t().mm(x.reshape({-1, J}).detach().cpu().to(torch::kFloat64));
    dgrad_error = std::max(dgrad_error, norm_error(x.grad(), g.to(torch::kFloat32).matmul(w.detach().to(torch::kFloat32))));
    const auto x_NJ = randn({N, J}, 70 + mb).to(bf16_options), g_NF = randn({N, F}, 80 + mb).to(bf16_options);
    if (!grouped) continue;  // the experts run their loop here, with ordinary gradients
    kernels::grouped_linear(x_NJ, w_EFJ, offs, rows).backward(g_NF);
    for (int64_t e = 0, at = 0; e < E; at += rows[static_cast<size_t>(e)], ++e) {
      const auto n = rows[static_cast<size_t>(e)];
      reference_E[e] += g_NF.narrow(0, at, n).cpu().to(torch::kFloat64).t().mm(x_NJ.narrow(0, at, n).cpu().to(torch::kFloat64));
    }
  }
  if (perturb) main_grad.mul_(kPerturbation);
  CheckRow c{Kernel::wgrad_accumulation, "linear, grouped_linear", "bf16",
             grouped ? fmt::format("[{}, {}] x {} rows and [{}, {}, {}] x {} rows, into fp32, 2 micro-batches", M, J,
                                   s.wgrad_rows, E, F, J, N)
                     : fmt::format("[{}, {}] x {} rows, into fp32, 2 micro-batches", M, J, s.wgrad_rows),
             NAN, std::max(norm_error(main_grad, reference), norm_error(main_grad_E, reference_E)),
             check_tolerance(torch::kFloat32), true,
             fmt::format("gradient: fp32 main_grad against the fp64 sum; input gradient {:.3g} (tolerance {:g}); {} "
                         "additions reported",
                         dgrad_error, check_tolerance(torch::kBFloat16), added)};
  c.ok = c.gradient_error <= c.tolerance && dgrad_error <= check_tolerance(torch::kBFloat16) &&
         added == (grouped ? 4 : 2) && !w.grad().defined() && !w_EFJ.grad().defined();
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

void check_device_after(const torch::Device& device, CheckRow& check) {
#ifdef MOEFORGE_WITH_CUDA
  if (!device.is_cuda()) return;
  const auto fault = device_fault(device);
  if (!fault) return;
  if (fault->sticky) {
    throw std::runtime_error(fmt::format(
        "kernel check on {}: the check of {} ({} {}) left a sticky CUDA error: {}. It corrupts the CUDA context "
        "(no later CUDA call of this process can succeed, the reference path's neither), so the run stops here. "
        "Rerun with model.kernels: reference to train without the fused kernels, and report the kernel",
        device.str(), kernel_name(check.kernel), check.dtype, check.shape, fault->error));
  }
  check.ok = false;
  check.forward_error = check.gradient_error = INFINITY;
  check.detail += fmt::format("; the device reported a CUDA error after it: {}", fault->error);
#else
  static_cast<void>(device);
  static_cast<void>(check);
#endif
}

bool wanted(const CheckConfig& config, torch::ScalarType dtype) {
  return std::find(config.dtypes.begin(), config.dtypes.end(), dtype) != config.dtypes.end();
}

}  // namespace

double check_tolerance(torch::ScalarType t) { return t == torch::kBFloat16 ? 3e-2 : 1e-4; }

CheckShapes startup_shapes() { return CheckShapes{.name = "start-up"}; }

std::vector<CheckShapes> conformance_shapes() {
  CheckShapes odd{.name = "odd",
                  .tokens = 7,
                  .hidden = 33,
                  .experts = 3,
                  .top_k = 3,
                  .ffn = 37,
                  .shared_ffn = 45,
                  .vocab = 101,
                  .head_hidden = 33,
                  .ce_chunk = 3,
                  .rope_BSHD = {1, 7, 5, 18},
                  .gemm_rows = {3, 0, 5},
                  .gemm_out = 17,
                  .adamw_sizes = {1, 17, 16389},
                  .wgrad_rows = 7,
                  .wgrad_out = 13,
                  .wgrad_expert_out = 9};
  CheckShapes empty{.name = "empty",
                    .tokens = 0,
                    .rope_BSHD = {1, 0, 3, 16},
                    .gemm_rows = {0, 0, 0, 0},
                    .adamw_sizes = {0},
                    .wgrad_rows = 0};
  // Qwen1.5-MoE-A2.7B's widths at 4 tokens: hidden 2048, 16 heads of 128, experts 1408 wide, the
  // shared expert 5632, 60 experts top-4, the vocabulary 151,936. Two are narrowed, because their
  // weights alone would take seconds and gigabytes on a CPU: the LM head is 128 wide (the real
  // [151936, 2048] is 1.2 GB in fp32, and its gradient as much again), and each expert of the grouped
  // GEMM and of the fused weight gradient has 64 outputs (60 x [1408, 2048] is 692 MB in fp32).
  std::vector<int64_t> rows(60, 0);
  for (int64_t slot = 0; slot < 16; ++slot) ++rows[static_cast<size_t>((slot * 7) % 60)];  // 4 tokens x top-4
  CheckShapes mission{.name = "mission",
                      .tokens = 4,
                      .hidden = 2048,
                      .experts = 60,
                      .top_k = 4,
                      .ffn = 1408,
                      .shared_ffn = 5632,
                      .vocab = 151936,
                      .head_hidden = 128,
                      .ce_chunk = 0,
                      .rope_BSHD = {1, 4, 16, 128},
                      .gemm_rows = rows,
                      .gemm_out = 64,
                      .adamw_sizes = {2048 * 1408, 5632},
                      .wgrad_rows = 4,
                      .wgrad_out = 1408,
                      .wgrad_expert_out = 64};
  return {startup_shapes(), odd, empty, mission};
}

std::vector<CheckRow> run_kernel_checks(const torch::Device& device, const CheckShapes& shapes, const CheckConfig& config) {
  std::vector<CheckRow> out;
  auto guarded = [&](CheckRow failed, const std::function<CheckRow()>& f) {
    try {
      out.push_back(f());
    } catch (const std::exception& e) {
      failed.ok = false;
      failed.forward_error = failed.gradient_error = INFINITY;
      failed.detail = e.what();
      out.push_back(failed);
    }
    check_device_after(device, out.back());  // on CUDA: a fault is this kernel's (above)
  };
  for (auto& c : cases(device, shapes)) {
    if (!fused(c.kernel, device.type())) continue;
    const bool perturb = config.perturb == c.kernel;
    const Fn fused_fn = perturb ? Fn([f = c.fused](const auto& x) { return f(x) * kPerturbation; }) : c.fused;
    for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      if (!wanted(config, dtype)) continue;
      std::vector<torch::Tensor> inputs;
      for (const auto& x : c.inputs) inputs.push_back(x.to(device, dtype));
      if (c.runs && !c.runs(inputs)) continue;  // the model runs the reference here too
      const CheckRow row{c.kernel, c.op, dtype_name(dtype), shapes_of(inputs), 0, 0, check_tolerance(dtype), true, ""};
      guarded(row, [&] {
        const auto a = run(fused_fn, inputs, c.differentiable), b = run(c.reference, inputs, c.differentiable);
        CheckRow r = row;
        r.forward_error = norm_error(a[0], b[0]);
        for (size_t i = 1; i < a.size() && i < b.size(); ++i) r.gradient_error = std::max(r.gradient_error, norm_error(a[i], b[i]));
        r.ok = a.size() == b.size() && r.forward_error <= r.tolerance && r.gradient_error <= r.tolerance;
        if (a.size() != b.size()) r.detail = fmt::format("{} gradients fused, {} in the reference", a.size() - 1, b.size() - 1);
        return r;
      });
    }
  }
  if (fused(Kernel::adamw, device.type()) && wanted(config, torch::kFloat32)) {
    std::vector<std::string> sizes;
    for (const auto n : shapes.adamw_sizes) sizes.push_back(fmt::format("[{}]", n));
    guarded({Kernel::adamw, "adamw_step", "fp32", fmt::format("{}", fmt::join(sizes, " ")), 0, NAN, check_tolerance(torch::kFloat32), true, ""},
            [&] { return check_adamw(device, shapes, fmt::format("{}", fmt::join(sizes, " ")), config.perturb == Kernel::adamw); });
  }
  if (fused(Kernel::wgrad_accumulation, device.type()) && wanted(config, torch::kBFloat16)) {
    guarded({Kernel::wgrad_accumulation, "linear, grouped_linear", "bf16", "", NAN, 0, check_tolerance(torch::kFloat32),
             true, ""},
            [&] { return check_wgrad(device, shapes, config.perturb == Kernel::wgrad_accumulation); });
  }
  return out;
}

std::optional<Kernel> kernel_from_name(const std::string& name) {
  for (int i = 0; i < kNumKernels; ++i) {
    if (name == kernel_name(static_cast<Kernel>(i))) return static_cast<Kernel>(i);
  }
  return std::nullopt;
}

std::string kernel_names() {
  std::vector<std::string> names;
  for (int i = 0; i < kNumKernels; ++i) names.emplace_back(kernel_name(static_cast<Kernel>(i)));
  return fmt::format("{}", fmt::join(names, ", "));
}

}  // namespace moeforge::kernels
