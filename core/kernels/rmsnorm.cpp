#include "core/kernels/rmsnorm.h"

#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/kernel_util.h"
#include "core/kernels/kernels.h"

#include <ATen/Parallel.h>

namespace moeforge::kernels {

namespace {

constexpr int64_t kRowBlock = 64;  // rows per dw partial: the reduction order is fixed, whatever the threads

std::vector<torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  auto y = torch::empty_like(x);
  auto r = torch::empty({rows}, x.options().dtype(torch::kFloat32));
  const float e = static_cast<float>(eps);
  if (x.is_cuda()) {
    MOEFORGE_CUDA_LAUNCH(cuda::rmsnorm_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), r.data_ptr<float>(), rows, D, e,
                                               is_bf16(x), stream_of(x)),
                         "rmsnorm forward");
    return {y, r};
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t end) {
    if (is_bf16(x)) {
      cpu::rmsnorm_forward(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                           r.data_ptr<float>(), D, e, b, end);
    } else {
      cpu::rmsnorm_forward(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), r.data_ptr<float>(), D, e, b, end);
    }
  });
  return {y, r};
}

std::pair<torch::Tensor, torch::Tensor> backward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& r,
                                                 const torch::Tensor& dy) {
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  auto dx = torch::empty_like(x);
  const int64_t blocks = std::max<int64_t>(1, (rows + kRowBlock - 1) / kRowBlock);
  auto partial = torch::zeros({blocks, D}, x.options().dtype(torch::kFloat32));
  if (x.is_cuda()) {
    MOEFORGE_CUDA_LAUNCH(cuda::rmsnorm_backward(x.data_ptr(), w.data_ptr(), r.data_ptr<float>(), dy.data_ptr(), dx.data_ptr(),
                                                partial.data_ptr<float>(), rows, D, kRowBlock, is_bf16(x), stream_of(x)),
                         "rmsnorm backward");
  } else {
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t end) {
      for (int64_t blk = b; blk < end; ++blk) {
        const int64_t first = blk * kRowBlock, last = std::min(rows, first + kRowBlock);
        float* acc = partial.data_ptr<float>() + blk * D;
        if (is_bf16(x)) {
          cpu::rmsnorm_backward(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), r.data_ptr<float>(),
                                dy.data_ptr<c10::BFloat16>(), dx.data_ptr<c10::BFloat16>(), acc, D, first, last);
        } else {
          cpu::rmsnorm_backward(x.data_ptr<float>(), w.data_ptr<float>(), r.data_ptr<float>(), dy.data_ptr<float>(),
                                dx.data_ptr<float>(), acc, D, first, last);
        }
      }
    });
  }
  return {dx, partial.sum(0).to(w.scalar_type())};
}

class RMSNorm : public torch::autograd::Function<RMSNorm> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               double eps) {
    const auto xc = x.contiguous(), wc = weight.contiguous();
    auto out = kernels::forward(xc, wc, eps);
    ctx->save_for_backward({xc, wc, out[1]});
    return out[0];
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw] = kernels::backward(saved[0], saved[1], saved[2], g[0].contiguous());
    return {dx, dw, {}};
  }
};

}  // namespace

torch::Tensor rms_norm_reference(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  // In fp32 whatever the input dtype, cast back before the weight (as the reference does).
  const auto x32 = x.to(torch::kFloat32);
  const auto normed = x32 * torch::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

torch::Tensor rms_norm_fused(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_dtype(x, "rms_norm");
  if (weight.scalar_type() != x.scalar_type() || weight.dim() != 1 || weight.size(0) != x.size(-1)) {
    throw std::invalid_argument("rms_norm: the weight must be [D] of the input's dtype");
  }
  return RMSNorm::apply(x, weight, eps);
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (supported_dtype(x) && weight.scalar_type() == x.scalar_type() && fused(Kernel::rmsnorm, x.device().type())) {
    return rms_norm_fused(x, weight, eps);
  }
  return rms_norm_reference(x, weight, eps);
}

}  // namespace moeforge::kernels
