// Gradient-accumulation fusion (core/kernels/wgrad_accumulation.h): bf16 weight gradients added
// into fp32 main_grad by the GEMM itself, against the fp64 sum of the exact products of the bf16
// operands, and against the bf16 path it replaces (each micro-batch's gradient rounded to bf16).
#include "../unit/model_fixture.h"
#include "../unit/test_util.h"
#include "core/kernels/cross_entropy.h"
#include "core/kernels/grouped_gemm.h"
#include "core/kernels/kernels.h"
#include "core/kernels/wgrad_accumulation.h"
#include "core/model/gpt_model.h"
#include "core/optim/optimizer.h"
#include "moe/model_loss.h"
#include "moe/moe_layer.h"
#include "parallel/data_parallel_optimizer.h"

#include <torch/torch.h>

#include <cmath>
#include <vector>

using namespace moeforge;

namespace {

double norm_error(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).norm().item<double>() / b.to(torch::kFloat64).norm().item<double>();
}

torch::Tensor randn_bf16(const std::vector<int64_t>& shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn(shape, gen, torch::kFloat32).to(torch::kBFloat16);
}

torch::Tensor exact_product(const torch::Tensor& g_NM, const torch::Tensor& x_NJ) {
  return g_NM.to(torch::kFloat64).t().mm(x_NJ.to(torch::kFloat64));
}

// Detaches on destruction, so a failed CHECK leaves no weight attached for later tests.
struct Attached {
  torch::Tensor weight, main_grad;
  int added = 0;
  Attached(const torch::Tensor& w) : weight(w), main_grad(torch::zeros(w.sizes(), torch::kFloat32)) {
    kernels::attach_main_grad(weight, main_grad, [this] { ++added; }, this);
  }
  ~Attached() { kernels::detach_main_grad(weight, this); }
  Attached(const Attached&) = delete;
  Attached& operator=(const Attached&) = delete;
};

}  // namespace

TEST_CASE("linear: an attached bf16 weight's gradient accumulates in fp32 over micro-batches, unrounded",
          "[kernels][wgrad]") {
  kernels::set_choice(KernelChoice::fused);
  // Many tokens: each bf16 rounding of a micro-batch's gradient costs about 2^-9 relative.
  const int64_t M = 48, J = 40, micro_batches = 4;
  const auto w = randn_bf16({M, J}, 1).requires_grad_(true), b = randn_bf16({M}, 2).requires_grad_(true);
  const auto w_plain = w.detach().clone().requires_grad_(true), b_plain = b.detach().clone().requires_grad_(true);
  Attached a(w);
  // The path it replaces: each micro-batch's bf16 gradient added into an fp32 accumulator.
  auto reference = torch::zeros({M, J}, torch::kFloat64), previous = torch::zeros({M, J});
  for (int64_t mb = 0; mb < micro_batches; ++mb) {
    const auto x = randn_bf16({3, 50, J}, 10 + mb).requires_grad_(true), g = randn_bf16({3, 50, M}, 20 + mb);
    const auto x_plain = x.detach().clone().requires_grad_(true);
    const auto y = kernels::linear(x, w, b), y_plain = torch::linear(x_plain, w_plain, b_plain);
    CHECK(torch::equal(y, y_plain));  // the forward is torch::linear's
    y.backward(g);
    y_plain.backward(g);
    reference += exact_product(g.reshape({-1, M}), x.detach().reshape({-1, J}));
    CHECK(norm_error(x.grad(), x_plain.grad()) < 1e-2);  // the input gradient: another bf16 GEMM order
    CHECK(a.added == mb + 1);
    CHECK_FALSE(w.grad().defined());  // no bf16 weight gradient exists
    previous += w_plain.grad();
    w_plain.mutable_grad() = torch::Tensor();
  }
  // The bias (a plain sum, not a GEMM) keeps its ordinary gradient.
  CHECK(norm_error(b.grad(), b_plain.grad()) < 1e-2);
  const double fused = norm_error(a.main_grad, reference), rounded = norm_error(previous, reference);
  INFO("fused " << fused << ", bf16 gradient " << rounded);
  CHECK(fused < 1e-6);
  CHECK(rounded > 100 * fused);
}

TEST_CASE("grouped_linear: each expert's gradient accumulates in fp32, an expert without rows untouched",
          "[kernels][wgrad]") {
  kernels::set_choice(KernelChoice::fused);
  const int64_t E = 4, F = 32, J = 16;
  const std::vector<int64_t> rows{37, 0, 64, 19};
  const auto x0 = randn_bf16({120, J}, 3);
  REQUIRE(kernels::grouped_mm_usable(x0, {F, J}));
  const auto offs = kernels::group_offsets(rows, torch::kCPU);
  const auto w = randn_bf16({E, F, J}, 4).requires_grad_(true);
  const auto w_plain = w.detach().clone().requires_grad_(true);
  Attached a(w);
  auto reference = torch::zeros({E, F, J}, torch::kFloat64), previous = torch::zeros({E, F, J});
  for (int64_t mb = 0; mb < 3; ++mb) {
    const auto x = randn_bf16({120, J}, 30 + mb).requires_grad_(true), g = randn_bf16({120, F}, 40 + mb);
    const auto x_plain = x.detach().clone().requires_grad_(true);
    const auto y = kernels::grouped_linear(x, w, offs, rows);
    const auto y_plain = kernels::grouped_mm(x_plain, w_plain.transpose(1, 2), offs);
    CHECK(torch::equal(y, y_plain));
    y.backward(g);
    y_plain.backward(g);
    CHECK(torch::equal(x.grad(), x_plain.grad()));  // the same grouped GEMM as autograd's
    previous += w_plain.grad();
    w_plain.mutable_grad() = torch::Tensor();
    for (int64_t e = 0, at = 0; e < E; at += rows[static_cast<size_t>(e)], ++e) {
      const auto n = rows[static_cast<size_t>(e)];
      reference[e] += exact_product(g.narrow(0, at, n), x.detach().narrow(0, at, n));
    }
  }
  CHECK(a.added == 3);
  CHECK_FALSE(w.grad().defined());
  CHECK(torch::equal(a.main_grad[1], torch::zeros({F, J})));
  const double fused = norm_error(a.main_grad, reference), rounded = norm_error(previous, reference);
  INFO("fused " << fused << ", bf16 gradient " << rounded);
  CHECK(fused < 1e-6);
  CHECK(rounded > 100 * fused);
}

TEST_CASE("the plain path where nothing is fused: not attached, fp32, frozen, no grad mode, reference kernels, detached",
          "[kernels][wgrad]") {
  const auto x = randn_bf16({8, 16}, 5), g = randn_bf16({8, 24}, 6);
  auto plain_grad = [&](const torch::Tensor& w) {
    torch::linear(x, w).backward(g);
    return w.grad();
  };
  SECTION("not attached") {
    kernels::set_choice(KernelChoice::fused);
    const auto w = randn_bf16({24, 16}, 7).requires_grad_(true), v = w.detach().clone().requires_grad_(true);
    kernels::linear(x, w).backward(g);
    CHECK(torch::equal(w.grad(), plain_grad(v)));
  }
  SECTION("reference kernels (model.kernels: reference)") {
    kernels::set_choice(KernelChoice::reference);
    const auto w = randn_bf16({24, 16}, 7).requires_grad_(true), v = w.detach().clone().requires_grad_(true);
    Attached a(w);
    kernels::linear(x, w).backward(g);
    kernels::set_choice(KernelChoice::fused);
    CHECK(a.added == 0);
    CHECK(torch::equal(w.grad(), plain_grad(v)));
  }
  SECTION("fp32 weights: autograd already accumulates them in place") {
    kernels::set_choice(KernelChoice::fused);
    const auto w = torch::randn({24, 16}).requires_grad_(true);
    Attached a(w);
    kernels::linear(x.to(torch::kFloat32), w).backward(g.to(torch::kFloat32));
    CHECK(a.added == 0);
    CHECK(w.grad().defined());
  }
  SECTION("frozen, and without grad mode") {
    kernels::set_choice(KernelChoice::fused);
    const auto w = randn_bf16({24, 16}, 7);
    Attached a(w);
    CHECK(torch::equal(kernels::linear(x, w), torch::linear(x, w)));
    const auto trainable = randn_bf16({24, 16}, 8).requires_grad_(true);
    Attached b(trainable);
    torch::NoGradGuard no_grad;
    CHECK_FALSE(kernels::linear(x, trainable).requires_grad());
  }
  SECTION("detached between forward and backward: an ordinary gradient") {
    kernels::set_choice(KernelChoice::fused);
    const auto w = randn_bf16({24, 16}, 7).requires_grad_(true), v = w.detach().clone().requires_grad_(true);
    torch::Tensor y;
    {
      Attached a(w);
      y = kernels::linear(x, w);
    }
    y.backward(g);
    CHECK(norm_error(w.grad(), plain_grad(v)) < 1e-2);
  }
  SECTION("grouped experts detached between forward and backward: an ordinary gradient") {
    kernels::set_choice(KernelChoice::fused);
    const std::vector<int64_t> rows{5, 0, 11};
    const auto offs = kernels::group_offsets(rows, torch::kCPU);
    const auto x_NJ = randn_bf16({16, 16}, 13), g_NF = randn_bf16({16, 32}, 14);
    const auto w_E = randn_bf16({3, 32, 16}, 15).requires_grad_(true), v_E = w_E.detach().clone().requires_grad_(true);
    torch::Tensor y;
    {
      Attached a(w_E);
      y = kernels::grouped_linear(x_NJ, w_E, offs, rows);
    }
    y.backward(g_NF);
    kernels::grouped_mm(x_NJ, v_E.transpose(1, 2), offs).backward(g_NF);
    REQUIRE(w_E.grad().defined());
    CHECK(norm_error(w_E.grad(), v_E.grad()) < 1e-2);
  }
}

TEST_CASE("the optimizer attaches its fp32 main_grad: its norm is the fp64 norm of the exact gradient sum",
          "[kernels][wgrad][optimizer]") {
  kernels::set_choice(KernelChoice::fused);
  const int64_t M = 32, J = 24;
  const auto w = randn_bf16({M, J}, 9).requires_grad_(true);
  TrainingConfig training;
  auto reference = torch::zeros({M, J}, torch::kFloat64);
  auto run = [&](Optimizer& opt) {
    for (int64_t mb = 0; mb < 3; ++mb) {
      const auto x = randn_bf16({64, J}, 50 + mb), g = randn_bf16({64, M}, 60 + mb);
      kernels::linear(x, w).backward(g);
      opt.accumulate_grads();
      reference += exact_product(g, x);
    }
  };
  {
    AdamW opt({{"w", w, true, false}}, training);
    run(opt);
    CHECK_FALSE(w.grad().defined());
    CHECK(opt.grad_norm() == Approx(reference.norm().item<double>()).epsilon(1e-6));
  }
  // Destroyed, the optimizer detached: the weight gets ordinary gradients again.
  kernels::linear(randn_bf16({4, J}, 70), w).backward(randn_bf16({4, M}, 71));
  CHECK(w.grad().defined());
  w.mutable_grad() = torch::Tensor();
  // ZeRO-1 on one process: the parameter's place in the flat bucket.
  reference.zero_();
  ParallelConfig parallel;
  parallel.use_distributed_optimizer = true;
  const auto opt = make_optimizer({{"w", w, true, false}}, training, ProcessGroups::single(), parallel);
  run(*opt);
  opt->reduce_grads();
  CHECK_FALSE(w.grad().defined());
  CHECK(opt->grad_norm() == Approx(reference.norm().item<double>()).epsilon(1e-6));
}

TEST_CASE("the LM head with the loss: an untied head's fp32 gradient goes into main_grad unrounded, a tied one's not",
          "[kernels][wgrad]") {
  kernels::set_choice(KernelChoice::fused);
  const int64_t T = 40, D = 32, V = 96;
  const auto h = randn_bf16({T, D}, 11);
  const auto labels = torch::arange(T, torch::kInt64).remainder(V - 5);
  const auto mask = (torch::arange(T) % 7 != 0).to(torch::kFloat32);
  const auto w = randn_bf16({V, D}, 12).requires_grad_(true), w_plain = w.detach().clone().requires_grad_(true);
  Attached a(w);
  // Chunks of 9 tokens: dw accumulates over five GEMMs in fp32 either way; the plain path rounds
  // it to bf16 once at the end.
  const auto loss = kernels::lm_head_cross_entropy_fused(h, w, labels, mask, 9, /*weight_used_once=*/true);
  const auto plain = kernels::lm_head_cross_entropy_fused(h, w_plain, labels, mask, 9);
  CHECK(torch::equal(loss, plain));
  loss.backward();
  plain.backward();
  CHECK(a.added == 1);
  CHECK_FALSE(w.grad().defined());
  CHECK(torch::equal(a.main_grad.to(torch::kBFloat16), w_plain.grad()));  // the plain path is its rounding
  CHECK_FALSE(torch::equal(a.main_grad.to(torch::kBFloat16).to(torch::kFloat32), a.main_grad));  // not rounded
  // The reference composition (whole logits, autograd) in fp64.
  const auto w64 = w.detach().to(torch::kFloat64).requires_grad_(true);
  kernels::lm_head_cross_entropy_reference(h.to(torch::kFloat64), w64, labels, mask).backward();
  CHECK(norm_error(a.main_grad, w64.grad()) < 1e-2);  // the logits are bf16 GEMM outputs
  // A second micro-batch, its loss scaled (the trainer's 1 / micro-batches): added, times the scale.
  const auto first = a.main_grad.clone();
  (kernels::lm_head_cross_entropy_fused(h, w, labels, mask, 9, true) * 0.25).backward();
  CHECK(a.added == 2);
  CHECK(torch::allclose(a.main_grad, first * 1.25, 1e-6, 1e-7));
  // Tied (the embedding's weight, with a gradient from its lookup too): the ordinary gradient.
  const auto tied = randn_bf16({V, D}, 12).requires_grad_(true);
  Attached b(tied);
  kernels::lm_head_cross_entropy_fused(h, tied, labels, mask, 9).backward();
  CHECK(b.added == 0);
  CHECK(tied.grad().defined());
}

TEST_CASE("a bf16 MoE model under AdamW: every GEMM weight's gradient is fused, the rest arrive in .grad",
          "[kernels][wgrad][model]") {
  kernels::set_choice(KernelChoice::fused);
  auto c = test::small_moe_config();
  c.moe_layer_freq.pattern = {1, 0};  // an MoE layer and a dense one
  c.num_query_groups = 2;
  c.add_qkv_bias = true;
  auto model = moe::build_model(c);
  model::init_megatron(*model, 3);
  model->to(torch::kBFloat16);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& p : model->named_parameters()) named.emplace_back(p.key(), p.value());
  TrainingConfig training;
  AdamW opt(select_trainable(named, training), training);
  const auto tokens = torch::randint(0, 256, {2, 16}, torch::kInt64);
  const auto positions = torch::arange(16, torch::kInt64).unsqueeze(0).expand({2, 16});
  const auto out = model->forward_layers(tokens, positions, 0, c.num_layers, model::HeadOutput::head_input);
  moe::model_loss(c, out, tokens, torch::ones({2, 16})).total.backward();
  // The weights of GEMMs: attention, the dense MLP, the shared expert and its gate, the router, the
  // grouped experts and the untied head. Not: norms, biases, the embedding (a lookup).
  auto fused = [](const std::string& name) {
    for (const char* part : {"_proj.weight", "mlp.gate.weight", "shared_expert_gate.weight", "experts.gate_up_proj",
                             "experts.down_proj", "lm_head.weight"}) {
      if (name.find(part) != std::string::npos) return true;
    }
    return false;
  };
  size_t n_fused = 0;
  for (const auto& [name, p] : named) {
    INFO(name);
    CHECK(p.grad().defined() != fused(name));
    n_fused += fused(name) ? 1 : 0;
  }
  CHECK(n_fused == 19);  // 2 x 4 attention, 3 + 1 + 1 + 2 in the MoE layer, 3 dense, the head
  opt.accumulate_grads();
  CHECK(std::isfinite(opt.grad_norm()));
  CHECK(opt.grad_norm() > 0);
}

TEST_CASE("the mixed-dtype probe keeps the first way this LibTorch runs right: on the CPU both fused calls are "
          "refused and the widened inputs, the last fallback, accumulate exactly",
          "[wgrad][kernels]") {
  // The CPU has neither addmm.dtype_out nor mm.dtype: the probe meets two real refusals there, the
  // path a LibTorch whose accelerator kernel refuses the dtype mix takes.
  const auto refused = kernels::probe_mixed_accumulate(torch::Device(torch::kCPU));
  INFO(refused);
  CHECK(kernels::mixed_accumulate_mode() == kernels::MixedAccumulate::widen);
  CHECK(refused.find("addmm with an fp32 out_dtype is refused on cpu") != std::string::npos);
  CHECK(refused.find("mm with an fp32 out_dtype, then add is refused on cpu") != std::string::npos);
  CHECK(refused.find("fp32 copies of both GEMM inputs") != std::string::npos);

  const auto g_NM = randn_bf16({37, 24}, 1);
  const auto x_NJ = randn_bf16({37, 16}, 2);
  auto main_grad_MJ = torch::randn({24, 16}, torch::kFloat32);
  const auto want = main_grad_MJ.to(torch::kFloat64) + exact_product(g_NM, x_NJ);
  kernels::accumulate_mixed(kernels::mixed_accumulate_mode(), main_grad_MJ, g_NM, x_NJ);
  CHECK(norm_error(main_grad_MJ, want) < 1e-6);
}
