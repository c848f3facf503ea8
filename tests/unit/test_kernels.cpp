// The kernel layer (core/kernels): every fused kernel against its reference composition, outputs
// and every input's gradient, norm-wise (|a - b| / |b|) within 1e-6 in fp32 and 1e-2 in bf16, on
// odd sizes, empty inputs and non-contiguous inputs. (The CUDA implementations: tests/gpu.)
#include "core/kernels/adamw.h"
#include "core/kernels/cross_entropy.h"
#include "core/kernels/grouped_gemm.h"
#include "core/kernels/kernels.h"
#include "core/kernels/moe_permute.h"
#include "core/kernels/rmsnorm.h"
#include "core/kernels/rope.h"
#include "core/kernels/self_check.h"
#include "core/kernels/swiglu.h"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

using namespace moeforge;

namespace {

double norm_error(const torch::Tensor& a, const torch::Tensor& b) {
  const auto d = (a.to(torch::kFloat64) - b.to(torch::kFloat64)).norm().item<double>();
  const auto n = b.to(torch::kFloat64).norm().item<double>();
  return n == 0 ? d : d / n;
}

double tolerance(torch::ScalarType t) { return t == torch::kBFloat16 ? 1e-2 : 1e-6; }

// f(inputs) through the kernel and through the reference, with the same upstream gradient: the
// outputs and the gradients of the first `differentiable` inputs (all of them by default) compared;
// the others (tables the kernel takes no gradient for) enter as constants.
void compare(const std::function<torch::Tensor(const std::vector<torch::Tensor>&)>& fused,
             const std::function<torch::Tensor(const std::vector<torch::Tensor>&)>& reference,
             const std::vector<torch::Tensor>& inputs, size_t differentiable = SIZE_MAX, uint64_t seed = 0) {
  auto run = [&](const auto& f) {
    std::vector<torch::Tensor> leaves;
    for (size_t i = 0; i < inputs.size(); ++i) {
      leaves.push_back(inputs[i].detach().clone().requires_grad_(inputs[i].is_floating_point() && i < differentiable));
    }
    const auto y = f(leaves);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
    const auto dy = torch::randn(y.sizes(), gen, torch::kFloat32).to(y.scalar_type());
    if (y.numel() > 0) y.backward(dy);
    std::vector<torch::Tensor> out{y.detach()};
    for (const auto& l : leaves) {
      if (l.requires_grad()) out.push_back(l.grad().defined() ? l.grad() : torch::zeros_like(l));
    }
    return out;
  };
  const auto a = run(fused), b = run(reference);
  REQUIRE(a.size() == b.size());
  const double tol = tolerance(inputs[0].scalar_type());
  for (size_t i = 0; i < a.size(); ++i) {
    INFO((i == 0 ? std::string("output") : "gradient of input " + std::to_string(i - 1)) << ", shape " << a[i].sizes());
    REQUIRE(a[i].sizes() == b[i].sizes());
    CHECK(a[i].scalar_type() == b[i].scalar_type());
    CHECK(norm_error(a[i], b[i]) <= tol);
  }
}

torch::Tensor randn(std::vector<int64_t> shape, torch::ScalarType dtype, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn(shape, gen, torch::kFloat32).to(dtype);
}

// The index maps of T tokens' K slots sorted stably by expert (expert E: dropped), built here from
// their definition: slot_of_row_N the kept slots in sorted order, row_of_slot_A their rows, -1 dropped.
std::pair<torch::Tensor, torch::Tensor> sorted_slots(const torch::Tensor& experts_A, int64_t E) {
  const auto order_A = std::get<1>(torch::sort(experts_A, /*stable=*/true, 0, false));
  const int64_t N = (experts_A < E).sum().item<int64_t>();
  const auto sor = order_A.narrow(0, 0, N).contiguous();
  auto ros = torch::full_like(experts_A, -1);
  for (int64_t n = 0; n < N; ++n) ros[sor[n].item<int64_t>()] = n;
  return {sor, ros};
}

}  // namespace

TEST_CASE("the CPU kernels are active here (AVX2 and FMA) with model.kernels: fused", "[kernels]") {
  kernels::set_choice(KernelChoice::fused);
  CHECK(kernels::fused(kernels::Kernel::swiglu, c10::DeviceType::CPU));
  CHECK_THAT(kernels::describe_kernels(), Catch::Matchers::Contains("swiglu (cpu"));
  kernels::set_choice(KernelChoice::reference);
  CHECK_FALSE(kernels::fused(kernels::Kernel::swiglu, c10::DeviceType::CPU));
  CHECK(kernels::describe_kernels() == "reference (model.kernels: reference)");
  kernels::set_choice(KernelChoice::fused);
}

TEST_CASE("swiglu: the fused kernel equals silu(gate) * up, forward and backward", "[kernels][swiglu]") {
  const auto fused = [](const auto& x) { return kernels::swiglu_fused(x[0]); };
  const auto reference = [](const auto& x) { return kernels::swiglu_reference(x[0]); };
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    INFO(c10::toString(dtype));
    for (const auto& shape : std::vector<std::vector<int64_t>>{{37, 2 * 64}, {5, 2 * 3}, {2, 3, 2 * 300}, {0, 2 * 16}, {1, 2}}) {
      INFO("shape " << shape);
      compare(fused, reference, {randn(shape, dtype, 3) * 3});
    }
    // A non-contiguous input: every other row of a larger tensor.
    compare(fused, reference, {randn({40, 2 * 24}, dtype, 4).slice(0, 0, 40, 2)});
    // Separate gate and up products (the dense MLP, the shared expert), one of them strided.
    const auto pair = [](const auto& x) { return kernels::swiglu_fused(x[0], x[1]); };
    const auto pair_reference = [](const auto& x) { return kernels::swiglu_reference(x[0], x[1]); };
    compare(pair, pair_reference, {randn({33, 70}, dtype, 13) * 3, randn({33, 70}, dtype, 14)});
    compare(pair, pair_reference, {randn({70, 33}, dtype, 15).t(), randn({33, 70}, dtype, 16)});
    compare(pair, pair_reference, {randn({0, 8}, dtype, 17), randn({0, 8}, dtype, 18)});
  }
}

TEST_CASE("grouped_mm: one grouped GEMM equals a product per group, with empty groups", "[kernels][grouped_gemm]") {
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    INFO(c10::toString(dtype));
    const std::vector<int64_t> rows{3, 0, 17, 1, 0, 9};
    const int64_t N = 30, K = 24, M = dtype == torch::kBFloat16 ? 24 : 20, E = 6;
    const auto offs = kernels::group_offsets(rows, torch::kCPU);
    CHECK(std::vector<int32_t>(offs.data_ptr<int32_t>(), offs.data_ptr<int32_t>() + E) ==
          std::vector<int32_t>{3, 3, 20, 21, 21, 30});
    REQUIRE(kernels::grouped_mm_usable(randn({1, K}, dtype, 0), {K, M}));
    CHECK_FALSE(kernels::grouped_mm_usable(randn({1, K}, dtype, 0), {K, 3}));  // rows not 16-byte aligned: the loop
    // The weights as the experts store them ([E, M, K]) and pass them: a transposed view.
    const auto fused = [&](const auto& x) { return kernels::grouped_mm(x[0], x[1].transpose(1, 2), offs); };
    const auto reference = [&](const auto& x) {
      std::vector<torch::Tensor> out;
      for (int64_t e = 0, at = 0; e < E; at += rows[static_cast<size_t>(e)], ++e) {
        out.push_back(torch::matmul(x[0].narrow(0, at, rows[static_cast<size_t>(e)]), x[1][e].t()));
      }
      return torch::cat(out);
    };
    compare(fused, reference, {randn({N, K}, dtype, 5), randn({E, M, K}, dtype, 6)});
  }
}

TEST_CASE("rms_norm: the fused kernel equals Hugging Face's RMSNorm, forward and backward", "[kernels][rmsnorm]") {
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    INFO(c10::toString(dtype));
    for (const auto& shape : std::vector<std::vector<int64_t>>{{70, 64}, {2, 5, 37}, {3, 3}, {0, 16}, {130, 2048}}) {
      INFO("shape " << shape);
      const auto fused = [](const auto& x) { return kernels::rms_norm_fused(x[0], x[1], 1e-6); };
      const auto reference = [](const auto& x) { return kernels::rms_norm_reference(x[0], x[1], 1e-6); };
      compare(fused, reference, {randn(shape, dtype, 7) * 2, randn({shape.back()}, dtype, 8) + 1});
    }
    // A non-contiguous input.
    const auto fused = [](const auto& x) { return kernels::rms_norm_fused(x[0], x[1], 1e-5); };
    const auto reference = [](const auto& x) { return kernels::rms_norm_reference(x[0], x[1], 1e-5); };
    compare(fused, reference, {randn({48, 40}, dtype, 9).t(), randn({48}, dtype, 10)});
  }
}

TEST_CASE("rope: the fused kernel equals x cos + rotate_half(x) sin, forward and backward", "[kernels][rope]") {
  const auto fused = [](const auto& x) { return kernels::rope_fused(x[0], x[1], x[2]); };
  const auto reference = [](const auto& x) { return kernels::rope_reference(x[0], x[1], x[2]); };
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    INFO(c10::toString(dtype));
    for (const auto& [B, S, H, Dh] : std::vector<std::array<int64_t, 4>>{{2, 9, 4, 32}, {1, 5, 3, 6}, {3, 0, 2, 8}, {1, 4, 1, 128}}) {
      INFO("B S H Dh " << B << " " << S << " " << H << " " << Dh);
      // The tables as RotaryEmbedding makes them: both halves the same angles.
      const auto angles = randn({B, S, Dh / 2}, torch::kFloat32, 11) * 3;
      const auto emb = torch::cat({angles, angles}, -1);
      compare(fused, reference, {randn({B, S, H, Dh}, dtype, 12), emb.cos().to(dtype), emb.sin().to(dtype)}, 1);
    }
  }
}

TEST_CASE("moe_permute / moe_combine: the fused kernels equal gather and weighted unsort, with dropped slots", "[kernels][permute]") {
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    INFO(c10::toString(dtype));
    for (const auto& [T, K, D, E] : std::vector<std::array<int64_t, 4>>{{37, 4, 24, 6}, {5, 1, 7, 3}, {0, 2, 8, 4}, {64, 2, 130, 8}}) {
      INFO("T K D E " << T << " " << K << " " << D << " " << E);
      auto gen = at::make_generator<at::CPUGeneratorImpl>(19);
      const auto experts_A = torch::randint(0, E + 1, {T * K}, gen, torch::kInt64);  // value E: dropped
      const auto [sor, ros] = sorted_slots(experts_A, E);
      const auto permute = [&](const auto& x) { return kernels::moe_permute_fused(x[0], sor, ros, K); };
      const auto permute_reference = [&](const auto& x) { return kernels::moe_permute_reference(x[0], sor, K); };
      compare(permute, permute_reference, {randn({T, D}, dtype, 20)});
      const auto combine = [&](const auto& x) { return kernels::moe_combine_fused(x[0], sor, ros, x[1]); };
      const auto combine_reference = [&](const auto& x) { return kernels::moe_combine_reference(x[0], ros, x[1]); };
      compare(combine, combine_reference, {randn({sor.size(0), D}, dtype, 21), randn({T, K}, dtype, 22).abs()});
    }
  }
}

TEST_CASE("moe_combine: a token's slots summed in slot order, the same bits on every run", "[kernels][permute]") {
  const int64_t T = 300, K = 4, D = 96, E = 16;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(23);
  const auto [sor, ros] = sorted_slots(torch::randint(0, E, {T * K}, gen, torch::kInt64), E);
  const auto y = randn({T * K, D}, torch::kFloat32, 24).requires_grad_();
  const auto w = randn({T, K}, torch::kFloat32, 25).requires_grad_();
  const auto dy = randn({T, D}, torch::kFloat32, 26);
  auto run = [&] {
    y.mutable_grad().reset();
    w.mutable_grad().reset();
    const auto out = kernels::moe_combine_fused(y, sor, ros, w);
    out.backward(dy);
    return std::array<torch::Tensor, 3>{out.detach(), y.grad().clone(), w.grad().clone()};
  };
  const auto a = run(), b = run();
  for (size_t i = 0; i < a.size(); ++i) CHECK(torch::equal(a[i], b[i]));
  // One-hot weights pick one slot's row exactly.
  const auto onehot_TK = torch::zeros({T, K}).index_fill_(1, torch::tensor({2}), 1.0);
  const auto picked = kernels::moe_combine_fused(y.detach(), sor, ros, onehot_TK);
  CHECK(torch::equal(picked, y.detach().index_select(0, ros.view({T, K}).select(1, 2))));
}

TEST_CASE("lm_head_cross_entropy: chunked head and loss equal the whole logits' cross-entropy", "[kernels][cross_entropy]") {
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    INFO(c10::toString(dtype));
    for (const auto& [T, D, V, chunk] : std::vector<std::array<int64_t, 4>>{{37, 24, 101, 8}, {5, 16, 3, 0}, {64, 32, 1000, 64}, {9, 8, 77, 1}}) {
      INFO("T D V chunk " << T << " " << D << " " << V << " " << chunk);
      auto gen = at::make_generator<at::CPUGeneratorImpl>(27);
      const auto labels = torch::randint(0, V, {T}, gen, torch::kInt64);
      auto mask = (torch::rand({T}, gen) > 0.25).to(torch::kFloat32);
      mask[0] = 1.0;
      const auto fused = [&](const auto& x) { return kernels::lm_head_cross_entropy_fused(x[0], x[1], labels, mask, chunk); };
      const auto reference = [&](const auto& x) { return kernels::lm_head_cross_entropy_reference(x[0], x[1], labels, mask); };
      compare(fused, reference, {randn({T, D}, dtype, 28), randn({V, D}, dtype, 29) * 0.5});
    }
  }
  // Without gradients (evaluation) only the loss is made.
  torch::NoGradGuard no_grad;
  const auto h = randn({12, 8}, torch::kFloat32, 30), w = randn({50, 8}, torch::kFloat32, 31);
  const auto labels = torch::arange(12, torch::kInt64), mask = torch::ones({12});
  CHECK(norm_error(kernels::lm_head_cross_entropy_fused(h, w, labels, mask, 5),
                   kernels::lm_head_cross_entropy_reference(h, w, labels, mask)) < 1e-6);
}

namespace {

// One parameter's AdamW state, the gradient positive and negative, moments of earlier steps.
kernels::AdamWTensors adamw_state(int64_t n, bool with_copy, bool decay, uint64_t seed) {
  kernels::AdamWTensors t;
  t.w = randn({n}, torch::kFloat32, seed);
  t.g = randn({n}, torch::kFloat32, seed + 1) * 0.1;
  t.exp_avg = randn({n}, torch::kFloat32, seed + 2) * 0.01;
  t.exp_avg_sq = randn({n}, torch::kFloat32, seed + 3).square() * 1e-3;
  if (with_copy) t.copy = torch::zeros({n}, torch::kBFloat16);
  t.decay = decay;
  return t;
}

std::vector<kernels::AdamWTensors> clone_states(const std::vector<kernels::AdamWTensors>& v) {
  std::vector<kernels::AdamWTensors> out;
  for (const auto& t : v) {
    out.push_back({t.w.clone(), t.g.clone(), t.exp_avg.clone(), t.exp_avg_sq.clone(),
                   t.copy.defined() ? t.copy.clone() : torch::Tensor(), t.decay});
  }
  return out;
}

}  // namespace

TEST_CASE("adamw_step: every tensor in one pass equals torch's AdamW composition, the bf16 copy its rounding",
          "[kernels][adamw]") {
  // Sizes around the vector width and the chunk (16384), an empty tensor, with and without decay
  // and the bf16 copy; three steps, so bias correction and the moments carry over.
  std::vector<kernels::AdamWTensors> state;
  uint64_t seed = 40;
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{8}, int64_t{131}, int64_t{16384 + 9}, int64_t{3 * 16384}}) {
    for (const bool copy : {false, true}) state.push_back(adamw_state(n, copy, /*decay=*/n % 2 == 1, seed += 4));
  }
  auto fused = clone_states(state), reference = clone_states(state);
  for (int64_t step = 1; step <= 3; ++step) {
    const kernels::AdamWHyper h{1e-3, 0.9, 0.95, 1e-8, 0.1, step};
    kernels::adamw_step_fused(fused, h);
    kernels::adamw_step_reference(reference, h);
  }
  for (size_t i = 0; i < state.size(); ++i) {
    INFO("tensor " << i << " of " << state[i].w.numel() << " elements");
    CHECK(norm_error(fused[i].w, reference[i].w) < 1e-6);
    CHECK(norm_error(fused[i].exp_avg, reference[i].exp_avg) < 1e-6);
    CHECK(norm_error(fused[i].exp_avg_sq, reference[i].exp_avg_sq) < 1e-6);
    CHECK(!torch::equal(fused[i].w, state[i].w) == (state[i].w.numel() > 0));
    if (state[i].copy.defined()) CHECK(torch::equal(fused[i].copy, fused[i].w.to(torch::kBFloat16)));
  }
}

TEST_CASE("adamw_step: an element's update does not depend on where its tensor is cut (ZeRO shards)", "[kernels][adamw]") {
  const int64_t n = 16384 * 2 + 77;
  const auto whole = adamw_state(n, true, true, 60);
  auto one = clone_states({whole});
  // The same elements as three pieces at odd offsets, as a sharded optimizer holds them.
  std::vector<kernels::AdamWTensors> pieces;
  for (const auto& [at, len] : std::vector<std::pair<int64_t, int64_t>>{{0, 13}, {13, 16384 + 3}, {16384 + 16, n - 16384 - 16}}) {
    pieces.push_back({whole.w.narrow(0, at, len).clone(), whole.g.narrow(0, at, len).clone(),
                      whole.exp_avg.narrow(0, at, len).clone(), whole.exp_avg_sq.narrow(0, at, len).clone(),
                      torch::zeros({len}, torch::kBFloat16), true});
  }
  const kernels::AdamWHyper h{3e-4, 0.9, 0.999, 1e-8, 0.01, 5};
  kernels::adamw_step_fused(one, h);
  kernels::adamw_step_fused(pieces, h);
  auto cat = [&](auto member) {
    std::vector<torch::Tensor> parts;
    for (const auto& p : pieces) parts.push_back(p.*member);
    return torch::cat(parts);
  };
  CHECK(torch::equal(cat(&kernels::AdamWTensors::w), one[0].w));
  CHECK(torch::equal(cat(&kernels::AdamWTensors::exp_avg), one[0].exp_avg));
  CHECK(torch::equal(cat(&kernels::AdamWTensors::exp_avg_sq), one[0].exp_avg_sq));
  CHECK(torch::equal(cat(&kernels::AdamWTensors::copy), one[0].copy));
}

TEST_CASE("self-check: every fused CPU kernel agrees with its reference, and a failure disables the kernel", "[kernels][self_check]") {
  kernels::set_choice(KernelChoice::fused);
  const auto checks = kernels::check_kernels(torch::kCPU);
  std::set<std::string> checked;
  for (const auto& c : checks) {
    INFO(kernels::kernel_name(c.kernel) << " " << c.detail << ": error " << c.error);
    CHECK(c.ok);
    checked.insert(kernels::kernel_name(c.kernel));
  }
  CHECK(checked == std::set<std::string>{"rmsnorm", "rope", "swiglu", "permute", "cross_entropy", "adamw", "grouped_gemm",
                                         "wgrad_accumulation"});
  // A made-up failure, on the CUDA device type so that this process's CPU kernels stay on: the
  // kernel is disabled there and reported.
  std::vector<kernels::KernelCheck> verdict{{kernels::Kernel::rope, true, 0, ""}, {kernels::Kernel::rope, false, 0.5, "bf16 [2]"}};
  std::vector<int64_t> seen;
  const auto disabled = kernels::agree_and_disable(verdict, c10::DeviceType::CUDA, [&](const std::vector<int64_t>& f) {
    seen = f;
    return f;
  });
  CHECK(disabled == std::vector<std::string>{"rope"});
  CHECK(seen.at(static_cast<size_t>(kernels::Kernel::rope)) == 1);
  CHECK_FALSE(kernels::fused(kernels::Kernel::rope, c10::DeviceType::CUDA));
  CHECK(kernels::fused(kernels::Kernel::rope, c10::DeviceType::CPU));
  // Under model.kernels: reference nothing runs fused, so nothing is checked.
  kernels::set_choice(KernelChoice::reference);
  CHECK(kernels::check_kernels(torch::kCPU).empty());
  kernels::set_choice(KernelChoice::fused);
}
