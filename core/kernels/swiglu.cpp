#include "core/kernels/swiglu.h"

#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/kernel_util.h"
#include "core/kernels/kernels.h"

#include <ATen/Parallel.h>

namespace moeforge::kernels {

namespace {

// Rows per parallel_for task: enough elements to pay for a task.
int64_t grain(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)); }

// Where gate and up live: their first elements and the distance between rows (both have it).
struct Halves {
  const void* gate;
  const void* up;
  int64_t ld, F, rows;
};

template <typename T>
const T* at(const void* p) {
  return static_cast<const T*>(p);
}

torch::Tensor forward(const Halves& h, const torch::Tensor& like) {
  auto sizes = like.sizes().vec();
  sizes.back() = h.F;
  auto y = torch::empty(sizes, like.options());
  if (like.is_cuda()) {
    MOEFORGE_CUDA_LAUNCH(cuda::swiglu_forward(h.gate, h.up, h.ld, y.data_ptr(), h.rows, h.F, is_bf16(like), stream_of(like)),
                         "swiglu forward");
    return y;
  }
  at::parallel_for(0, h.rows, grain(h.F), [&](int64_t b, int64_t e) {
    if (is_bf16(like)) {
      cpu::swiglu_forward(at<c10::BFloat16>(h.gate), at<c10::BFloat16>(h.up), h.ld, y.data_ptr<c10::BFloat16>(), h.F, b, e);
    } else {
      cpu::swiglu_forward(at<float>(h.gate), at<float>(h.up), h.ld, y.data_ptr<float>(), h.F, b, e);
    }
  });
  return y;
}

// d_gate and d_up at the same strides as gate and up.
void backward(const Halves& h, const torch::Tensor& dy, void* d_gate, void* d_up) {
  if (dy.is_cuda()) {
    MOEFORGE_CUDA_LAUNCH(cuda::swiglu_backward(h.gate, h.up, h.ld, dy.data_ptr(), d_gate, d_up, h.rows, h.F, is_bf16(dy),
                                               stream_of(dy)),
                         "swiglu backward");
    return;
  }
  at::parallel_for(0, h.rows, grain(h.F), [&](int64_t b, int64_t e) {
    if (is_bf16(dy)) {
      cpu::swiglu_backward(at<c10::BFloat16>(h.gate), at<c10::BFloat16>(h.up), h.ld, dy.data_ptr<c10::BFloat16>(),
                           static_cast<c10::BFloat16*>(d_gate), static_cast<c10::BFloat16*>(d_up), h.F, b, e);
    } else {
      cpu::swiglu_backward(at<float>(h.gate), at<float>(h.up), h.ld, dy.data_ptr<float>(), static_cast<float*>(d_gate),
                           static_cast<float*>(d_up), h.F, b, e);
    }
  });
}

Halves halves_of(const torch::Tensor& gate_up) {
  const int64_t F = gate_up.size(-1) / 2;
  const auto* base = static_cast<const char*>(gate_up.data_ptr());
  return {base, base + F * static_cast<int64_t>(gate_up.element_size()), 2 * F, F, gate_up.numel() / std::max<int64_t>(2 * F, 1)};
}

class SwiGLUFused : public torch::autograd::Function<SwiGLUFused> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate_up) {
    const auto gu = gate_up.contiguous();
    ctx->save_for_backward({gu});
    return kernels::forward(halves_of(gu), gu);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto gu = ctx->get_saved_variables()[0];
    auto d = torch::empty_like(gu);
    const Halves h = halves_of(gu);
    auto* dg = static_cast<char*>(d.data_ptr());
    kernels::backward(h, g[0].contiguous(), dg, dg + h.F * static_cast<int64_t>(d.element_size()));
    return {d};
  }
};

class SwiGLUPair : public torch::autograd::Function<SwiGLUPair> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate, const torch::Tensor& up) {
    const auto g = gate.contiguous(), u = up.contiguous();
    ctx->save_for_backward({g, u});
    const int64_t F = g.size(-1);
    return kernels::forward({g.data_ptr(), u.data_ptr(), F, F, g.numel() / std::max<int64_t>(F, 1)}, g);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &g = saved[0], &u = saved[1];
    auto dg = torch::empty_like(g), du = torch::empty_like(u);
    const int64_t F = g.size(-1);
    kernels::backward({g.data_ptr(), u.data_ptr(), F, F, g.numel() / std::max<int64_t>(F, 1)}, grads[0].contiguous(),
                      dg.data_ptr(), du.data_ptr());
    return {dg, du};
  }
};

}  // namespace

torch::Tensor swiglu_reference(const torch::Tensor& gate_up) {
  const auto halves = gate_up.chunk(2, -1);
  return torch::silu(halves[0]) * halves[1];
}

torch::Tensor swiglu_reference(const torch::Tensor& gate, const torch::Tensor& up) { return torch::silu(gate) * up; }

torch::Tensor swiglu_fused(const torch::Tensor& gate_up) {
  check_dtype(gate_up, "swiglu");
  if (gate_up.size(-1) % 2 != 0) throw std::invalid_argument("swiglu: the last dimension of gate_up must be even (gate, up)");
  return SwiGLUFused::apply(gate_up);
}

torch::Tensor swiglu_fused(const torch::Tensor& gate, const torch::Tensor& up) {
  check_dtype(gate, "swiglu");
  if (gate.sizes() != up.sizes() || gate.scalar_type() != up.scalar_type()) {
    throw std::invalid_argument("swiglu: gate and up must have one shape and dtype");
  }
  return SwiGLUPair::apply(gate, up);
}

torch::Tensor swiglu(const torch::Tensor& gate_up) {
  if (supported_dtype(gate_up) && fused(Kernel::swiglu, gate_up.device().type())) return swiglu_fused(gate_up);
  return swiglu_reference(gate_up);
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (supported_dtype(gate) && gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() &&
      fused(Kernel::swiglu, gate.device().type())) {
    return swiglu_fused(gate, up);
  }
  return swiglu_reference(gate, up);
}

}  // namespace moeforge::kernels
