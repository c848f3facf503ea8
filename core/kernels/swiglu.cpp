#include "core/kernels/swiglu.h"

#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/kernels.h"

#ifdef MOEFORGE_WITH_CUDA
#include "core/kernels/cuda/cuda_kernels.h"

#include <c10/cuda/CUDAStream.h>
#endif

#include <ATen/Parallel.h>

#include <stdexcept>

namespace moeforge::kernels {

namespace {

// Rows per parallel_for task: enough elements to pay for a task.
int64_t grain(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)); }

void check_supported(const torch::Tensor& t, const char* what) {
  if (t.scalar_type() != torch::kFloat32 && t.scalar_type() != torch::kBFloat16) {
    throw std::invalid_argument(std::string("swiglu: ") + what + " must be fp32 or bf16");
  }
}

#ifdef MOEFORGE_WITH_CUDA
void check_cuda(int rc, const char* what) {
  if (rc != 0) throw std::runtime_error(std::string("swiglu: CUDA launch of ") + what + " failed (error " + std::to_string(rc) + ")");
}
void* stream_of(const torch::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
#endif

torch::Tensor forward(const torch::Tensor& gu) {
  const int64_t F = gu.size(-1) / 2, rows = gu.numel() / std::max<int64_t>(2 * F, 1);
  auto sizes = gu.sizes().vec();
  sizes.back() = F;
  auto y = torch::empty(sizes, gu.options());
  if (gu.is_cuda()) {
#ifdef MOEFORGE_WITH_CUDA
    check_cuda(cuda::swiglu_forward(gu.data_ptr(), y.data_ptr(), rows, F, gu.scalar_type() == torch::kBFloat16, stream_of(gu)),
               "the forward");
    return y;
#else
    throw std::invalid_argument("swiglu: a CUDA tensor in a build without CUDA");
#endif
  }
  at::parallel_for(0, rows, grain(F), [&](int64_t b, int64_t e) {
    if (gu.scalar_type() == torch::kBFloat16) {
      cpu::swiglu_forward(gu.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), F, b, e);
    } else {
      cpu::swiglu_forward(gu.data_ptr<float>(), y.data_ptr<float>(), F, b, e);
    }
  });
  return y;
}

torch::Tensor backward(const torch::Tensor& gu, const torch::Tensor& dy) {
  const int64_t F = gu.size(-1) / 2, rows = gu.numel() / std::max<int64_t>(2 * F, 1);
  auto d = torch::empty_like(gu);
  if (gu.is_cuda()) {
#ifdef MOEFORGE_WITH_CUDA
    check_cuda(cuda::swiglu_backward(gu.data_ptr(), dy.data_ptr(), d.data_ptr(), rows, F,
                                     gu.scalar_type() == torch::kBFloat16, stream_of(gu)),
               "the backward");
    return d;
#else
    throw std::invalid_argument("swiglu: a CUDA tensor in a build without CUDA");
#endif
  }
  at::parallel_for(0, rows, grain(F), [&](int64_t b, int64_t e) {
    if (gu.scalar_type() == torch::kBFloat16) {
      cpu::swiglu_backward(gu.data_ptr<c10::BFloat16>(), dy.data_ptr<c10::BFloat16>(), d.data_ptr<c10::BFloat16>(), F, b, e);
    } else {
      cpu::swiglu_backward(gu.data_ptr<float>(), dy.data_ptr<float>(), d.data_ptr<float>(), F, b, e);
    }
  });
  return d;
}

class SwiGLU : public torch::autograd::Function<SwiGLU> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate_up) {
    const auto gu = gate_up.contiguous();
    ctx->save_for_backward({gu});
    return kernels::forward(gu);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const auto gu = ctx->get_saved_variables()[0];
    return {kernels::backward(gu, grads[0].contiguous())};
  }
};

}  // namespace

torch::Tensor swiglu_reference(const torch::Tensor& gate_up) {
  const auto halves = gate_up.chunk(2, -1);
  return torch::silu(halves[0]) * halves[1];
}

torch::Tensor swiglu_fused(const torch::Tensor& gate_up) {
  check_supported(gate_up, "gate_up");
  if (gate_up.size(-1) % 2 != 0) throw std::invalid_argument("swiglu: the last dimension of gate_up must be even (gate, up)");
  return SwiGLU::apply(gate_up);
}

torch::Tensor swiglu(const torch::Tensor& gate_up) {
  const bool dtype_ok = gate_up.scalar_type() == torch::kFloat32 || gate_up.scalar_type() == torch::kBFloat16;
  if (dtype_ok && fused(Kernel::swiglu, gate_up.device().type())) return swiglu_fused(gate_up);
  return swiglu_reference(gate_up);
}

}  // namespace moeforge::kernels
