#include "core/kernels/adamw.h"

#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/kernel_util.h"
#include "core/kernels/kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <stdexcept>

namespace moeforge::kernels {

namespace {

AdamWScalars scalars_of(const AdamWHyper& h, bool decay) {
  const double bias1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(h.step)));
  const double decay_factor = decay && h.weight_decay > 0 ? 1.0 - h.lr * h.weight_decay : 1.0;
  return {static_cast<float>(decay_factor), static_cast<float>(1.0 - h.beta1), static_cast<float>(h.beta2),
          static_cast<float>(1.0 - h.beta2),  static_cast<float>(bias2_sqrt),    static_cast<float>(h.eps),
          static_cast<float>(-h.lr / bias1)};
}

void check(const AdamWTensors& t) {
  const int64_t n = t.w.numel();
  for (const auto* x : {&t.w, &t.g, &t.exp_avg, &t.exp_avg_sq}) {
    if (x->scalar_type() != torch::kFloat32 || !x->is_contiguous() || x->numel() != n || x->device() != t.w.device()) {
      throw std::invalid_argument("adamw_step: w, g and the moments must be contiguous fp32 tensors of one size and device");
    }
  }
  if (t.copy.defined() && (t.copy.scalar_type() != torch::kBFloat16 || !t.copy.is_contiguous() || t.copy.numel() != n ||
                           t.copy.device() != t.w.device())) {
    throw std::invalid_argument("adamw_step: the copy must be a contiguous bf16 tensor as large as w");
  }
}

uint16_t* copy_bits(const AdamWTensors& t) {
  return t.copy.defined() ? reinterpret_cast<uint16_t*>(t.copy.data_ptr<c10::BFloat16>()) : nullptr;
}

// Every tensor cut into chunks of kAdamWChunk elements.
std::vector<AdamWChunk> chunk_table(const std::vector<AdamWTensors>& tensors, const AdamWHyper& h) {
  std::vector<AdamWChunk> chunks;
  for (const auto& t : tensors) {
    const float decay_factor = scalars_of(h, t.decay).decay_factor;
    auto* w = t.w.data_ptr<float>();
    const auto* g = t.g.data_ptr<float>();
    auto *m = t.exp_avg.data_ptr<float>(), *v = t.exp_avg_sq.data_ptr<float>();
    auto* copy = copy_bits(t);
    for (int64_t at = 0; at < t.w.numel(); at += kAdamWChunk) {
      chunks.push_back({w + at, g + at, m + at, v + at, copy ? copy + at : nullptr,
                        std::min(kAdamWChunk, t.w.numel() - at), decay_factor});
    }
  }
  return chunks;
}

void run_cpu(const std::vector<AdamWChunk>& chunks, AdamWScalars s) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const auto& c = chunks[static_cast<size_t>(i)];
      AdamWScalars cs = s;
      cs.decay_factor = c.decay_factor;
      cpu::adamw(c.w, c.g, c.m, c.v, reinterpret_cast<c10::BFloat16*>(c.copy), c.n, cs);
    }
  });
}

// Without CUDA the launch macro throws before it reads `s`.
void run_cuda(const std::vector<AdamWChunk>& chunks, [[maybe_unused]] AdamWScalars s, const torch::Device& device) {
  // The table travels as bytes: pinned, copied on the current stream (the caching host allocator
  // keeps the pinned block until the copy has run).
  const auto bytes = static_cast<int64_t>(chunks.size() * sizeof(AdamWChunk));
  auto host = torch::empty({bytes}, torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));  // host: staging
  std::memcpy(host.data_ptr(), chunks.data(), static_cast<size_t>(bytes));
  const auto table = host.to(device, /*non_blocking=*/true);
  MOEFORGE_CUDA_LAUNCH(cuda::adamw(reinterpret_cast<const AdamWChunk*>(table.data_ptr()),
                                   static_cast<int64_t>(chunks.size()), s, stream_of(table)),
                       "adamw");
}

}  // namespace

void adamw_step_reference(const std::vector<AdamWTensors>& tensors, const AdamWHyper& h) {
  torch::NoGradGuard no_grad;
  const double bias1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(h.step)));
  for (const auto& t : tensors) {
    auto w = t.w;
    if (t.decay && h.weight_decay > 0) w.mul_(1.0 - h.lr * h.weight_decay);
    t.exp_avg.lerp_(t.g, 1.0 - h.beta1);
    t.exp_avg_sq.mul_(h.beta2).addcmul_(t.g, t.g, 1.0 - h.beta2);
    const auto denom = (t.exp_avg_sq.sqrt() / bias2_sqrt).add_(h.eps);
    w.addcdiv_(t.exp_avg, denom, -h.lr / bias1);
    if (t.copy.defined()) t.copy.copy_(w);
  }
}

void adamw_step_fused(const std::vector<AdamWTensors>& tensors, const AdamWHyper& h) {
  if (tensors.empty()) return;
  for (const auto& t : tensors) check(t);
  const auto device = tensors.front().w.device();
  for (const auto& t : tensors) {
    if (t.w.device() != device) throw std::invalid_argument("adamw_step: every tensor on one device");
  }
  const auto chunks = chunk_table(tensors, h);
  const auto s = scalars_of(h, true);
  if (device.is_cuda()) {
    run_cuda(chunks, s, device);
  } else {
    run_cpu(chunks, s);
  }
}

void adamw_step(const std::vector<AdamWTensors>& tensors, const AdamWHyper& h) {
  if (!tensors.empty() && fused(Kernel::adamw, tensors.front().w.device().type())) {
    adamw_step_fused(tensors, h);
  } else {
    adamw_step_reference(tensors, h);
  }
}

}  // namespace moeforge::kernels
