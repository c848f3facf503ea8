// defines: the CPU kernels over raw pointers (compiled for AVX2 + FMA in their own library; see
//          core/kernels/kernels.h), one function per pass, over rows [begin, end) so that the
//          caller splits the work with at::parallel_for
#pragma once

#include "core/kernels/adamw_math.h"

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moeforge::kernels::cpu {

// SwiGLU y = silu(gate) * up over rows of F; gate and up rows start `ld` elements apart (2F for a
// fused gate/up product, where up is gate + F; F for separate tensors). The backward writes
// d_gate and d_up with the same strides.
void swiglu_forward(const float* gate, const float* up, int64_t ld_in, float* y, int64_t F, int64_t begin, int64_t end);
void swiglu_forward(const c10::BFloat16* gate, const c10::BFloat16* up, int64_t ld_in, c10::BFloat16* y, int64_t F,
                    int64_t begin, int64_t end);
void swiglu_backward(const float* gate, const float* up, int64_t ld_in, const float* dy, float* d_gate, float* d_up,
                     int64_t F, int64_t begin, int64_t end);
void swiglu_backward(const c10::BFloat16* gate, const c10::BFloat16* up, int64_t ld_in, const c10::BFloat16* dy,
                     c10::BFloat16* d_gate, c10::BFloat16* d_up, int64_t F, int64_t begin, int64_t end);

// RMSNorm over rows of D: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) kept per row (fp32). In
// bf16 the normalized row is rounded before the weight multiplies it, as the reference does.
void rmsnorm_forward(const float* x, const float* w, float* y, float* r, int64_t D, float eps, int64_t begin, int64_t end);
void rmsnorm_forward(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, float* r, int64_t D, float eps,
                     int64_t begin, int64_t end);
// dx for rows [begin, end) and their contribution to dw added into dw_acc (fp32, D).
void rmsnorm_backward(const float* x, const float* w, const float* r, const float* dy, float* dx, float* dw_acc,
                      int64_t D, int64_t begin, int64_t end);
void rmsnorm_backward(const c10::BFloat16* x, const c10::BFloat16* w, const float* r, const c10::BFloat16* dy,
                      c10::BFloat16* dx, float* dw_acc, int64_t D, int64_t begin, int64_t end);

// Half-split RoPE on rows of Dh (x [B, S, H, Dh] contiguous, row = (b S + s) H + h) with tables
// cos/sin [B S, Dh] (both halves equal): out = x cos + rotate_half(x) sin. `sign` -1 applies the
// inverse rotation (the backward: dx = dy cos - rotate_half(dy sin) = RoPE of dy at -angle).
void rope(const float* x, const float* cos, const float* sin, float* out, int64_t H, int64_t Dh, float sign, int64_t begin,
          int64_t end);
void rope(const c10::BFloat16* x, const c10::BFloat16* cos, const c10::BFloat16* sin, c10::BFloat16* out, int64_t H,
          int64_t Dh, float sign, int64_t begin, int64_t end);

// MoE permutation (core/kernels/moe_permute.h), rows of D, K slots per token; row_of_slot -1 for a
// dropped slot. permute: x_ND[n] = x_TD[slot_of_row[n] / K] for rows [begin, end); its backward
// dx_TD[t] = sum over k of dx_ND[row_of_slot[t K + k]] for tokens [begin, end), in slot order.
template <typename T>
void moe_permute(const T* x_TD, const int64_t* slot_of_row, T* x_ND, int64_t D, int64_t K, int64_t begin, int64_t end);
template <typename T>
void moe_permute_backward(const T* dx_ND, const int64_t* row_of_slot, T* dx_TD, int64_t D, int64_t K, int64_t begin,
                          int64_t end);
// combine: y_TD[t] = sum over k of w[t K + k] y_ND[row_of_slot[t K + k]] for tokens [begin, end);
// backward: dy_ND[n] = w[s] dy_TD[s / K] (s = slot_of_row[n]) for rows [begin, end), and
// dw[s] = dy_TD[s / K] . y_ND[row_of_slot[s]] for slots [begin, end).
template <typename T>
void moe_combine(const T* y_ND, const int64_t* row_of_slot, const T* w_A, T* y_TD, int64_t D, int64_t K, int64_t begin,
                 int64_t end);
template <typename T>
void moe_combine_backward_rows(const T* dy_TD, const int64_t* slot_of_row, const T* w_A, T* dy_ND, int64_t D, int64_t K,
                               int64_t begin, int64_t end);
template <typename T>
void moe_combine_backward_weights(const T* dy_TD, const T* y_ND, const int64_t* row_of_slot, T* dw_A, int64_t D,
                                  int64_t K, int64_t begin, int64_t end);

// Cross-entropy (core/kernels/cross_entropy.h) over rows [begin, end) of logits [rows, V]:
// loss[r] = logsumexp(row) - row[labels[r]] (NaN for a label outside [0, V)); with `grad` the row
// is overwritten by its gradient, (softmax(row) - onehot(label)) * scale[r].
template <typename T>
void cross_entropy_rows(T* logits, int64_t V, const int64_t* labels, const float* scale, float* loss, bool grad,
                        int64_t begin, int64_t end);

// AdamW (core/kernels/adamw.h) over n elements; copy (bf16) may be null.
void adamw(float* w, const float* g, float* m, float* v, c10::BFloat16* copy, int64_t n, const AdamWScalars& s);

}  // namespace moeforge::kernels::cpu
