// Kernel micro-benchmarks (run by hand; results in docs/kernels.md): each fused kernel against its
// reference composition on the same inputs in one run, forward + backward, median of several
// repetitions; for the memory-bound kernels also the bytes the fused kernel must move at least
// (inputs read once, outputs written once) per second, against a plain copy (memcpy) of as many
// bytes on the same machine.
//   build/tests/bench/bench_kernels [THREADS] [--bf16] [--cuda]   (--cuda: on GPU 0; tests/gpu/device_check.sh)
#include "core/kernels/adamw.h"
#include "core/kernels/cross_entropy.h"
#include "core/kernels/grouped_gemm.h"
#include "core/kernels/moe_permute.h"
#include "core/kernels/rmsnorm.h"
#include "core/kernels/rope.h"
#include "core/kernels/swiglu.h"
#include "core/kernels/wgrad_accumulation.h"

#include <fmt/format.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using namespace moeforge;

namespace {

using Inputs = std::vector<torch::Tensor>;
using Fn = std::function<torch::Tensor(const Inputs&)>;

torch::Device g_device = torch::kCPU;

void sync() {
  if (g_device.is_cuda()) torch::cuda::synchronize();
}

double median_seconds(int reps, const std::function<void()>& f) {
  f();  // warm-up: first touch of every buffer
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    sync();
    const auto a = std::chrono::steady_clock::now();
    f();
    sync();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Forward and backward of f on fresh leaves (the first `differentiable` inputs get gradients),
// the upstream gradient made once outside the timing.
double time_fwd_bwd(const Fn& f, const Inputs& inputs, size_t differentiable, int reps) {
  auto leaves = [&] {
    Inputs l;
    for (size_t i = 0; i < inputs.size(); ++i) l.push_back(inputs[i].detach().requires_grad_(i < differentiable));
    return l;
  };
  const auto dy = torch::ones_like(f(leaves()).detach());
  return median_seconds(reps, [&] { f(leaves()).backward(dy); });
}

// GB/s of copies of `bytes / 2` bytes (a copy reads and writes them: `bytes` moved): into an
// existing tensor, and into a new one (clone), as the kernels write their outputs into new tensors,
// whose allocation and first touch cost as much again where the allocator returns large blocks to
// the system on every free (glibc's default above 32 MiB).
std::pair<double, double> copy_gbs(int64_t bytes, int reps) {
  const auto src = torch::ones({bytes / 2}, torch::TensorOptions(torch::kUInt8).device(g_device));
  const auto dst = torch::empty_like(src);
  const double b = static_cast<double>(bytes);
  return {b / median_seconds(reps, [&] { dst.copy_(src); }) / 1e9, b / median_seconds(reps, [&] { (void)src.clone(); }) / 1e9};
}

torch::Tensor randn(const std::vector<int64_t>& shape, torch::ScalarType dtype, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn(shape, gen, torch::kFloat32).to(g_device, dtype);
}

void row(const std::string& name, double fused_s, double reference_s, int64_t bytes, int reps) {
  fmt::print("{:<46s} {:9.2f} {:9.2f} {:7.2f}x", name, 1e3 * fused_s, 1e3 * reference_s, reference_s / fused_s);
  if (bytes > 0) {
    const double gbs = static_cast<double>(bytes) / fused_s / 1e9;
    const auto [copy, clone] = copy_gbs(bytes, reps);
    fmt::print(" {:8.2f} {:8.2f} {:8.2f}\n", gbs, copy, clone);
  } else {
    fmt::print(" {:>8s} {:>8s} {:>8s}\n", "-", "-", "-");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  bool bf16 = false;
  for (int i = 2; i < argc; ++i) {
    bf16 = bf16 || std::strcmp(argv[i], "--bf16") == 0;
    if (std::strcmp(argv[i], "--cuda") == 0) g_device = torch::Device(torch::kCUDA, 0);
  }
  torch::set_num_threads(threads);
  const auto dt = bf16 ? torch::kBFloat16 : torch::kFloat32;
  const int64_t e = bf16 ? 2 : 4;  // bytes per element
  const int reps = 7;
  fmt::print("kernels on {}, {} threads, {}: forward + backward, median of {} (ms); bytes the fused kernel must move per "
             "second against a copy\n",
             g_device.str(), threads, bf16 ? "bf16" : "fp32", reps);
  fmt::print("{:<46s} {:>9s} {:>9s} {:>8s} {:>8s} {:>8s} {:>8s}\n", "kernel (shape)", "fused", "reference", "speedup",
             "GB/s", "copy", "clone");

  {  // RMSNorm: fwd reads x, writes y; bwd reads x, dy, writes dx.
    const int64_t T = 4096, D = 2048;
    const Inputs in{randn({T, D}, dt, 1), randn({D}, dt, 2)};
    row(fmt::format("rmsnorm [{}, {}]", T, D), time_fwd_bwd([](const Inputs& x) { return kernels::rms_norm_fused(x[0], x[1], 1e-6); }, in, 2, reps),
        time_fwd_bwd([](const Inputs& x) { return kernels::rms_norm_reference(x[0], x[1], 1e-6); }, in, 2, reps),
        5 * T * D * e, reps);
  }
  {  // RoPE on q: fwd reads x, writes y; bwd the same (the tables are small and stay cached).
    const int64_t B = 4, S = 1024, H = 16, Dh = 128;
    const Inputs in{randn({B, S, H, Dh}, dt, 3), randn({B, S, Dh}, dt, 4), randn({B, S, Dh}, dt, 5)};
    row(fmt::format("rope [{}, {}, {}, {}]", B, S, H, Dh),
        time_fwd_bwd([](const Inputs& x) { return kernels::rope_fused(x[0], x[1], x[2]); }, in, 1, reps),
        time_fwd_bwd([](const Inputs& x) { return kernels::rope_reference(x[0], x[1], x[2]); }, in, 1, reps),
        4 * B * S * H * Dh * e, reps);
  }
  {  // SwiGLU from gate_up [T, 2F]: fwd reads 2F writes F; bwd reads 2F + F, writes 2F.
    const int64_t T = 4096, F = 1408;
    const Inputs in{randn({T, 2 * F}, dt, 6)};
    row(fmt::format("swiglu [{}, 2 x {}]", T, F), time_fwd_bwd([](const Inputs& x) { return kernels::swiglu_fused(x[0]); }, in, 1, reps),
        time_fwd_bwd([](const Inputs& x) { return kernels::swiglu_reference(x[0]); }, in, 1, reps), 8 * T * F * e, reps);
  }
  // The MoE permutation: T tokens, top-K over E experts (uniform), rows of D.
  const int64_t T = 4096, K = 4, E = 60, D = 2048, N = T * K;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const auto experts_A = torch::randint(0, E, {N}, gen, torch::kInt64);
  const auto order_cpu = std::get<1>(torch::sort(experts_A, /*stable=*/true, 0, false));
  auto ros_cpu = torch::empty({N}, torch::kInt64);
  ros_cpu.index_put_({order_cpu}, torch::arange(N, torch::kInt64));
  const auto order = order_cpu.to(g_device), ros = ros_cpu.to(g_device);
  {  // permute: fwd reads N rows, writes N; bwd reads N, writes T.
    const Inputs in{randn({T, D}, dt, 8)};
    row(fmt::format("moe_permute [{}, {}] -> [{}, {}]", T, D, N, D),
        time_fwd_bwd([&](const Inputs& x) { return kernels::moe_permute_fused(x[0], order, ros, K); }, in, 1, reps),
        time_fwd_bwd([&](const Inputs& x) { return kernels::moe_permute_reference(x[0], order, K); }, in, 1, reps),
        (3 * N + T) * D * e, reps);
  }
  {  // combine: fwd reads N rows, writes T; bwd reads T (K times, cached) and N rows, writes N.
    const Inputs in{randn({N, D}, dt, 9), randn({T, K}, dt, 10).abs()};
    row(fmt::format("moe_combine [{}, {}] -> [{}, {}]", N, D, T, D),
        time_fwd_bwd([&](const Inputs& x) { return kernels::moe_combine_fused(x[0], order, ros, x[1]); }, in, 2, reps),
        time_fwd_bwd([&](const Inputs& x) { return kernels::moe_combine_reference(x[0], ros, x[1]); }, in, 2, reps),
        (3 * N + 2 * T) * D * e, reps);
  }
  {  // The LM head and loss: three GEMMs either way; the fused one never holds the logits.
    const int64_t Tc = 1024, Dc = 256, V = 32000;
    const auto labels = torch::randint(0, V, {Tc}, gen, torch::kInt64).to(g_device);
    const auto mask = torch::ones({Tc}, torch::TensorOptions().device(g_device));
    const Inputs in{randn({Tc, Dc}, dt, 11), randn({V, Dc}, dt, 12) * 0.05};
    row(fmt::format("lm_head_cross_entropy [{}, {}] x [{}, {}]", Tc, Dc, V, Dc),
        time_fwd_bwd([&](const Inputs& x) { return kernels::lm_head_cross_entropy_fused(x[0], x[1], labels, mask); }, in, 2, 3),
        time_fwd_bwd([&](const Inputs& x) { return kernels::lm_head_cross_entropy_reference(x[0], x[1], labels, mask); }, in, 2, 3),
        0, reps);
  }
  {  // The routed experts: one grouped GEMM against a product per expert (the bench model's shape).
    const int64_t Ng = 4096, Kg = 256, Mg = 128;
    std::vector<int64_t> rows(E, Ng / E);
    rows.back() += Ng - (Ng / E) * E;
    const auto offs = kernels::group_offsets(rows, g_device);
    const Inputs in{randn({Ng, Kg}, dt, 13), randn({E, Mg, Kg}, dt, 14)};
    row(fmt::format("grouped_mm [{}, {}] x {} x [{}, {}]", Ng, Kg, E, Kg, Mg),
        time_fwd_bwd([&](const Inputs& x) { return kernels::grouped_mm(x[0], x[1].transpose(1, 2), offs); }, in, 2, reps),
        time_fwd_bwd([&](const Inputs& x) {
          std::vector<torch::Tensor> out;
          for (int64_t g = 0, at = 0; g < E; at += rows[static_cast<size_t>(g)], ++g) {
            out.push_back(torch::matmul(x[0].narrow(0, at, rows[static_cast<size_t>(g)]), x[1][g].t()));
          }
          return torch::cat(out);
        }, in, 2, reps),
        0, reps);
  }
  if (bf16) {  // A weight gradient into fp32 main_grad: in the GEMM, against a bf16 GEMM then an add.
    // One micro-batch of the expert width's products (2,048 tokens x 2,048 hidden -> 1,408).
    const int64_t Tw = 2048, Kw = 2048, Mw = 1408;
    const auto g = randn({Tw, Mw}, dt, 15), x = randn({Tw, Kw}, dt, 16);
    auto main_grad = torch::zeros({Mw, Kw}, torch::TensorOptions().device(g_device));
    const auto fused = median_seconds(reps, [&] { kernels::accumulate_wgrad(main_grad, g, x); });
    const auto reference = median_seconds(reps, [&] { main_grad.add_(g.t().mm(x)); });
    row(fmt::format("wgrad_accumulation [{}, {}]x[{}, {}]", Tw, Mw, Tw, Kw), fused, reference, 0, reps);
  }
  {  // AdamW over 16M parameters in 64 tensors, with the bf16 copy: reads w, g, m, v; writes w, m, v, copy.
    const int64_t P = 64, n = 262144;
    auto make = [&] {
      std::vector<kernels::AdamWTensors> s;
      for (int64_t i = 0; i < P; ++i) {
        const auto fp32 = torch::TensorOptions().device(g_device);
        s.push_back({randn({n}, torch::kFloat32, 20), randn({n}, torch::kFloat32, 21) * 0.1, torch::zeros({n}, fp32),
                     torch::zeros({n}, fp32), torch::zeros({n}, fp32.dtype(torch::kBFloat16)), i % 2 == 0});
      }
      return s;
    };
    auto a = make(), b = make();
    int64_t step = 0;
    const auto fused = median_seconds(reps, [&] { kernels::adamw_step_fused(a, {1e-3, 0.9, 0.95, 1e-8, 0.1, ++step}); });
    step = 0;
    const auto reference = median_seconds(reps, [&] { kernels::adamw_step_reference(b, {1e-3, 0.9, 0.95, 1e-8, 0.1, ++step}); });
    row(fmt::format("adamw {} x [{}] + bf16 copy (fp32 state)", P, n), fused, reference, P * n * 30, reps);
  }
  return 0;
}
