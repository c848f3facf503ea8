#include "core/kernels/rope.h"

#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/kernel_util.h"
#include "core/kernels/kernels.h"

#include <ATen/Parallel.h>

namespace moeforge::kernels {

namespace {

torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, float sign) {
  const int64_t H = x.size(2), Dh = x.size(3), rows = x.numel() / std::max<int64_t>(Dh, 1);
  auto out = torch::empty_like(x);
  if (x.is_cuda()) {
    MOEFORGE_CUDA_LAUNCH(cuda::rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), rows, H, Dh, sign,
                                    is_bf16(x), stream_of(x)),
                         "rope");
    return out;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(Dh, 1)), [&](int64_t b, int64_t e) {
    if (is_bf16(x)) {
      cpu::rope(x.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(),
                out.data_ptr<c10::BFloat16>(), H, Dh, sign, b, e);
    } else {
      cpu::rope(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<float>(), H, Dh, sign, b, e);
    }
  });
  return out;
}

class Rope : public torch::autograd::Function<Rope> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& cos,
                               const torch::Tensor& sin) {
    const auto c = cos.contiguous(), s = sin.contiguous();
    ctx->save_for_backward({c, s});
    return rotate(x.contiguous(), c, s, 1.0f);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto saved = ctx->get_saved_variables();
    return {rotate(g[0].contiguous(), saved[0], saved[1], -1.0f), {}, {}};
  }
};

}  // namespace

torch::Tensor rope_reference(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2);
}

torch::Tensor rope_fused(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  check_dtype(x, "rope");
  if (x.dim() != 4 || cos.dim() != 3 || cos.sizes() != sin.sizes() || cos.size(0) != x.size(0) ||
      cos.size(1) != x.size(1) || cos.size(2) != x.size(3) || x.size(3) % 2 != 0 || cos.scalar_type() != x.scalar_type()) {
    throw std::invalid_argument("rope: x [B, S, H, Dh] (Dh even) and cos, sin [B, S, Dh] of x's dtype");
  }
  return Rope::apply(x, cos, sin);
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (supported_dtype(x) && cos.scalar_type() == x.scalar_type() && fused(Kernel::rope, x.device().type())) {
    return rope_fused(x, cos, sin);
  }
  return rope_reference(x, cos, sin);
}

}  // namespace moeforge::kernels
