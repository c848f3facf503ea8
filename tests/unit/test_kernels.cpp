// The kernel layer (core/kernels): every fused kernel against its reference composition, outputs
// and every input's gradient, norm-wise (|a - b| / |b|) within 1e-6 in fp32 and 1e-2 in bf16, on
// odd sizes, empty inputs and non-contiguous inputs. (The CUDA implementations: tests/gpu.)
#include "core/kernels/grouped_gemm.h"
#include "core/kernels/kernels.h"
#include "core/kernels/moe_permute.h"
#include "core/kernels/rmsnorm.h"
#include "core/kernels/rope.h"
#include "core/kernels/swiglu.h"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <functional>
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
// their definition: slot_of_row_N the kept slots in sorted order, row_of_slot_S their rows, -1 dropped.
std::pair<torch::Tensor, torch::Tensor> sorted_slots(const torch::Tensor& experts_S, int64_t E) {
  const auto order_S = std::get<1>(torch::sort(experts_S, /*stable=*/true, 0, false));
  const int64_t N = (experts_S < E).sum().item<int64_t>();
  const auto sor = order_S.narrow(0, 0, N).contiguous();
  auto ros = torch::full_like(experts_S, -1);
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
      const auto experts_S = torch::randint(0, E + 1, {T * K}, gen, torch::kInt64);  // value E: dropped
      const auto [sor, ros] = sorted_slots(experts_S, E);
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
