#include "core/kernels/cross_entropy.h"

#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/kernel_util.h"
#include "core/kernels/kernels.h"
#include "core/kernels/wgrad_accumulation.h"

#include <ATen/Parallel.h>

namespace moeforge::kernels {

namespace {

// loss_T (fp32) for the chunk's rows; logits_CV overwritten by their gradient when `grad`.
void cross_entropy_rows(torch::Tensor& logits_CV, const torch::Tensor& labels_C, const torch::Tensor& scale_C,
                        torch::Tensor& loss_C, bool grad) {
  const int64_t C = logits_CV.size(0), V = logits_CV.size(1);
  if (logits_CV.is_cuda()) {
    MOEFORGE_CUDA_LAUNCH(cuda::cross_entropy_rows(logits_CV.data_ptr(), C, V, labels_C.data_ptr<int64_t>(),
                                                  scale_C.data_ptr<float>(), loss_C.data_ptr<float>(), grad,
                                                  is_bf16(logits_CV), stream_of(logits_CV)),
                         "cross_entropy");
    return;
  }
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    if (is_bf16(logits_CV)) {
      cpu::cross_entropy_rows(logits_CV.data_ptr<c10::BFloat16>(), V, labels_C.data_ptr<int64_t>(), scale_C.data_ptr<float>(),
                              loss_C.data_ptr<float>(), grad, b, e);
    } else {
      cpu::cross_entropy_rows(logits_CV.data_ptr<float>(), V, labels_C.data_ptr<int64_t>(), scale_C.data_ptr<float>(),
                              loss_C.data_ptr<float>(), grad, b, e);
    }
  });
}

// dw_acc (fp32) += a^T b: in fp32 on an accelerator (the way probe_mixed_accumulate chose) and for
// fp32 inputs (accumulate_wgrad); a bf16 product then added on the CPU, where widening a chunk of
// logits to fp32 would cost more than the GEMM.
void add_product(torch::Tensor& dw_acc, const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.is_cpu() || a.scalar_type() == torch::kFloat32) {
    accumulate_wgrad(dw_acc, a, b);
    return;
  }
  dw_acc.add_(torch::mm(a.t(), b));
}

class LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& h_TD, const torch::Tensor& w_VD,
                               const torch::Tensor& labels_T, const torch::Tensor& mask_T, const torch::Tensor& count,
                               int64_t chunk_rows, bool grad, int64_t wgrad_key) {
    const int64_t T = h_TD.size(0), V = w_VD.size(0);
    const auto h = h_TD.contiguous();
    const auto mask = mask_T.to(torch::kFloat32).contiguous();
    // Each token's share of the mean, on the device (no host sync).
    const auto scale_T = (mask / count).contiguous();
    auto loss_T = torch::empty({T}, mask.options());
    torch::Tensor dh_TD, dw_acc;
    if (grad) {
      dh_TD = torch::empty_like(h);
      dw_acc = torch::zeros({V, w_VD.size(1)}, w_VD.options().dtype(torch::kFloat32));
    }
    for (int64_t at = 0; at < T; at += chunk_rows) {
      const int64_t n = std::min(chunk_rows, T - at);
      const auto h_C = h.narrow(0, at, n);
      auto logits_CV = torch::mm(h_C, w_VD.t());
      auto loss_C = loss_T.narrow(0, at, n);
      cross_entropy_rows(logits_CV, labels_T.narrow(0, at, n), scale_T.narrow(0, at, n), loss_C, grad);
      if (!grad) continue;
      auto dh_C = dh_TD.narrow(0, at, n);
      torch::mm_out(dh_C, logits_CV, w_VD);
      add_product(dw_acc, logits_CV, h_C);
    }
    if (grad) {
      ctx->saved_data["dh"] = dh_TD;
      // Fused into main_grad (wgrad_accumulation.h): kept in fp32 until the backward scales it.
      ctx->saved_data["dw"] = wgrad_key ? dw_acc : dw_acc.to(w_VD.scalar_type());
      ctx->saved_data["key"] = wgrad_key;
    }
    return (loss_T * mask).sum() / count;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto dh = ctx->saved_data["dh"].toTensor(), dw = ctx->saved_data["dw"].toTensor();
    const bool added = add_to_main_grad(ctx->saved_data["key"].toInt(),
                                        [&](torch::Tensor& main_grad) { main_grad.addcmul_(dw, g[0].to(torch::kFloat32)); });
    const auto gw = added ? torch::Tensor() : (dw * g[0].to(dw.scalar_type())).to(dh.scalar_type());
    return {dh * g[0].to(dh.scalar_type()), gw, {}, {}, {}, {}, {}, {}};
  }
};

// The mean's denominator: `tokens` where given, else the mask's count.
torch::Tensor denominator(const torch::Tensor& mask, const torch::Tensor& tokens) {
  return tokens.defined() ? tokens.to(mask.options()) : mask.sum();
}

}  // namespace

torch::Tensor masked_cross_entropy(const torch::Tensor& logits_TV, const torch::Tensor& labels_T,
                                   const torch::Tensor& loss_mask_T, const torch::Tensor& tokens) {
  const auto per_token = torch::nn::functional::cross_entropy(
      logits_TV.to(torch::kFloat32), labels_T, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
  const auto mask = loss_mask_T.to(torch::kFloat32);
  return (per_token * mask).sum() / denominator(mask, tokens);
}

torch::Tensor lm_head_cross_entropy_reference(const torch::Tensor& h_TD, const torch::Tensor& w_VD,
                                              const torch::Tensor& labels_T, const torch::Tensor& loss_mask_T,
                                              const torch::Tensor& tokens) {
  return masked_cross_entropy(torch::matmul(h_TD, w_VD.t()), labels_T, loss_mask_T, tokens);
}

torch::Tensor lm_head_cross_entropy_fused(const torch::Tensor& h_TD, const torch::Tensor& w_VD, const torch::Tensor& labels_T,
                                          const torch::Tensor& loss_mask_T, int64_t chunk_rows, bool weight_used_once,
                                          const torch::Tensor& tokens) {
  check_dtype(h_TD, "lm_head_cross_entropy");
  if (w_VD.scalar_type() != h_TD.scalar_type() || labels_T.scalar_type() != torch::kInt64 || h_TD.dim() != 2 ||
      w_VD.dim() != 2 || labels_T.dim() != 1 || labels_T.size(0) != h_TD.size(0) || loss_mask_T.numel() != h_TD.size(0)) {
    throw std::invalid_argument("lm_head_cross_entropy: h [T, D] and w [V, D] of one dtype, int64 labels [T], a mask of T");
  }
  const int64_t V = w_VD.size(0);
  if (chunk_rows <= 0) chunk_rows = std::max<int64_t>(1, kChunkBytes / (V * static_cast<int64_t>(h_TD.element_size())));
  // The gradients are made in the forward; only when autograd will ask for them.
  const bool grad = torch::GradMode::is_enabled() && (h_TD.requires_grad() || w_VD.requires_grad());
  const int64_t key = grad && weight_used_once ? fused_wgrad_key(w_VD) : 0;
  const auto mask_T = loss_mask_T.reshape({-1});
  const auto count = denominator(mask_T.to(torch::kFloat32), tokens);
  return LinearCrossEntropy::apply(h_TD, w_VD, labels_T.contiguous(), mask_T, count, chunk_rows, grad, key);
}

torch::Tensor lm_head_cross_entropy(const torch::Tensor& h_TD, const torch::Tensor& w_VD, const torch::Tensor& labels_T,
                                    const torch::Tensor& loss_mask_T, bool weight_used_once, const torch::Tensor& tokens) {
  if (supported_dtype(h_TD) && w_VD.scalar_type() == h_TD.scalar_type() && fused(Kernel::cross_entropy, h_TD.device().type())) {
    return lm_head_cross_entropy_fused(h_TD, w_VD, labels_T, loss_mask_T, 0, weight_used_once, tokens);
  }
  return lm_head_cross_entropy_reference(h_TD, w_VD, labels_T, loss_mask_T, tokens);
}

}  // namespace moeforge::kernels
