#include "core/kernels/moe_permute.h"

#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/kernel_util.h"
#include "core/kernels/kernels.h"

#include <ATen/Parallel.h>

namespace moeforge::kernels {

namespace {

int64_t grain(int64_t D) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)); }

// Calls f.template operator()<T>() with T the element type of `t` (fp32 or bf16).
template <typename F>
void by_dtype(const torch::Tensor& t, F&& f) {
  if (is_bf16(t)) {
    f(c10::BFloat16{});
  } else {
    f(float{});
  }
}

torch::Tensor permute_forward(const torch::Tensor& x, const torch::Tensor& sor, int64_t K) {
  const int64_t N = sor.numel(), D = x.size(1);
  auto out = torch::empty({N, D}, x.options());
  if (x.is_cuda()) {
    MOEFORGE_CUDA_LAUNCH(cuda::moe_permute(x.data_ptr(), sor.data_ptr<int64_t>(), out.data_ptr(), N, D, K, is_bf16(x),
                                           stream_of(x)),
                         "moe_permute");
    return out;
  }
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    at::parallel_for(0, N, grain(D), [&](int64_t b, int64_t e) {
      cpu::moe_permute(x.data_ptr<T>(), sor.data_ptr<int64_t>(), out.data_ptr<T>(), D, K, b, e);
    });
  });
  return out;
}

// Sums each token's rows (weighted when w is defined): moe_permute's backward and moe_combine.
torch::Tensor gather_sum(const torch::Tensor& rows, const torch::Tensor& ros, const torch::Tensor& w, int64_t T, int64_t K) {
  const int64_t D = rows.size(1);
  auto out = torch::empty({T, D}, rows.options());
  if (rows.is_cuda()) {
    MOEFORGE_CUDA_LAUNCH(w.defined() ? cuda::moe_combine(rows.data_ptr(), ros.data_ptr<int64_t>(), w.data_ptr(),
                                                         out.data_ptr(), T, D, K, is_bf16(rows), stream_of(rows))
                                     : cuda::moe_permute_backward(rows.data_ptr(), ros.data_ptr<int64_t>(), out.data_ptr(),
                                                                  T, D, K, is_bf16(rows), stream_of(rows)),
                         "moe gather-sum");
    return out;
  }
  by_dtype(rows, [&](auto zero) {
    using E = decltype(zero);
    at::parallel_for(0, T, grain(D * K), [&](int64_t b, int64_t e) {
      if (w.defined()) {
        cpu::moe_combine(rows.data_ptr<E>(), ros.data_ptr<int64_t>(), w.data_ptr<E>(), out.data_ptr<E>(), D, K, b, e);
      } else {
        cpu::moe_permute_backward(rows.data_ptr<E>(), ros.data_ptr<int64_t>(), out.data_ptr<E>(), D, K, b, e);
      }
    });
  });
  return out;
}

class Permute : public torch::autograd::Function<Permute> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& sor,
                               const torch::Tensor& ros, int64_t K) {
    ctx->save_for_backward({ros});
    ctx->saved_data["K"] = K;
    ctx->saved_data["T"] = x.size(0);
    return permute_forward(x.contiguous(), sor, K);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto ros = ctx->get_saved_variables()[0];
    return {gather_sum(g[0].contiguous(), ros, {}, ctx->saved_data["T"].toInt(), ctx->saved_data["K"].toInt()), {}, {}, {}};
  }
};

class Combine : public torch::autograd::Function<Combine> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& y, const torch::Tensor& sor,
                               const torch::Tensor& ros, const torch::Tensor& w_TK) {
    const auto yc = y.contiguous(), w = w_TK.contiguous();
    ctx->save_for_backward({yc, sor, ros, w});
    return gather_sum(yc, ros, w, w.size(0), w.size(1));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto saved = ctx->get_saved_variables();
    const auto &y = saved[0], &sor = saved[1], &ros = saved[2], &w = saved[3];
    const auto dy = g[0].contiguous();
    const int64_t N = y.size(0), D = y.size(1), T = w.size(0), K = w.size(1);
    auto dy_ND = torch::empty_like(y), dw = torch::empty_like(w);
    if (y.is_cuda()) {
      MOEFORGE_CUDA_LAUNCH(cuda::moe_combine_backward(dy.data_ptr(), y.data_ptr(), sor.data_ptr<int64_t>(),
                                                      ros.data_ptr<int64_t>(), w.data_ptr(), dy_ND.data_ptr(),
                                                      dw.data_ptr(), N, T, D, K, is_bf16(y), stream_of(y)),
                           "moe_combine backward");
    } else {
      by_dtype(y, [&](auto zero) {
        using E = decltype(zero);
        at::parallel_for(0, N, grain(D), [&](int64_t b, int64_t e) {
          cpu::moe_combine_backward_rows(dy.data_ptr<E>(), sor.data_ptr<int64_t>(), w.data_ptr<E>(), dy_ND.data_ptr<E>(),
                                         D, K, b, e);
        });
        at::parallel_for(0, T * K, grain(D), [&](int64_t b, int64_t e) {
          cpu::moe_combine_backward_weights(dy.data_ptr<E>(), y.data_ptr<E>(), ros.data_ptr<int64_t>(), dw.data_ptr<E>(),
                                            D, K, b, e);
        });
      });
    }
    return {dy_ND, {}, {}, dw};
  }
};

void check_indices(const torch::Tensor& sor, const torch::Tensor& ros, const torch::Tensor& x, const char* kernel) {
  if (sor.scalar_type() != torch::kInt64 || ros.scalar_type() != torch::kInt64 || sor.device() != x.device() ||
      ros.device() != x.device() || !sor.is_contiguous() || !ros.is_contiguous()) {
    throw std::invalid_argument(std::string(kernel) + ": the index tensors must be contiguous int64 on the data's device");
  }
}

}  // namespace

torch::Tensor moe_permute_reference(const torch::Tensor& x_TD, const torch::Tensor& slot_of_row_N, int64_t K) {
  const int64_t T = x_TD.size(0), D = x_TD.size(1);
  return x_TD.unsqueeze(1).expand({T, K, D}).reshape({T * K, D}).index_select(0, slot_of_row_N);
}

torch::Tensor moe_combine_reference(const torch::Tensor& y_ND, const torch::Tensor& row_of_slot_A, const torch::Tensor& w_TK) {
  const int64_t T = w_TK.size(0), K = w_TK.size(1), N = y_ND.size(0), D = y_ND.size(1);
  // Dropped slots (row -1) read a row of zeros appended at N.
  const auto padded = torch::cat({y_ND, torch::zeros({1, D}, y_ND.options())});
  const auto rows_A = torch::where(row_of_slot_A < 0, torch::full_like(row_of_slot_A, N), row_of_slot_A);
  return (padded.index_select(0, rows_A).view({T, K, D}) * w_TK.unsqueeze(-1)).sum(1);
}

torch::Tensor moe_permute_fused(const torch::Tensor& x_TD, const torch::Tensor& sor, const torch::Tensor& ros, int64_t K) {
  check_dtype(x_TD, "moe_permute");
  check_indices(sor, ros, x_TD, "moe_permute");
  return Permute::apply(x_TD, sor, ros, K);
}

torch::Tensor moe_combine_fused(const torch::Tensor& y_ND, const torch::Tensor& sor, const torch::Tensor& ros,
                                const torch::Tensor& w_TK) {
  check_dtype(y_ND, "moe_combine");
  check_indices(sor, ros, y_ND, "moe_combine");
  if (w_TK.scalar_type() != y_ND.scalar_type()) throw std::invalid_argument("moe_combine: the weights must be in y's dtype");
  return Combine::apply(y_ND, sor, ros, w_TK);
}

torch::Tensor moe_permute(const torch::Tensor& x_TD, const torch::Tensor& sor, const torch::Tensor& ros, int64_t K) {
  if (supported_dtype(x_TD) && fused(Kernel::permute, x_TD.device().type())) return moe_permute_fused(x_TD, sor, ros, K);
  return moe_permute_reference(x_TD, sor, K);
}

torch::Tensor moe_combine(const torch::Tensor& y_ND, const torch::Tensor& sor, const torch::Tensor& ros,
                          const torch::Tensor& w_TK) {
  if (supported_dtype(y_ND) && w_TK.scalar_type() == y_ND.scalar_type() && fused(Kernel::permute, y_ND.device().type())) {
    return moe_combine_fused(y_ND, sor, ros, w_TK);
  }
  return moe_combine_reference(y_ND, ros, w_TK);
}

}  // namespace moeforge::kernels
