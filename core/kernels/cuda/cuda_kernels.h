// defines: the CUDA kernels' launchers over raw pointers (no torch headers on the CUDA side; the
//          stream is the caller's current cudaStream_t, passed as void*). Each returns the CUDA
//          error of its launch (0 = cudaSuccess).
#pragma once

#include "core/kernels/adamw_math.h"

#include <cstdint>

namespace moeforge::kernels::cuda {

// SwiGLU (core/kernels/swiglu.h): gate and up rows `ld` elements apart (2F fused, F separate); `bf16`
// selects __nv_bfloat16 elements, else float.
int swiglu_forward(const void* gate, const void* up, int64_t ld, void* y, int64_t rows, int64_t F, bool bf16, void* stream);
int swiglu_backward(const void* gate, const void* up, int64_t ld, const void* dy, void* d_gate, void* d_up, int64_t rows,
                    int64_t F, bool bf16, void* stream);

// RMSNorm (core/kernels/rmsnorm.h): r [rows] fp32 out of the forward; the backward writes dx and
// dw_partial [ceil(rows / row_block), D] (fp32, summed over blocks by the caller, in order).
int rmsnorm_forward(const void* x, const void* w, void* y, float* r, int64_t rows, int64_t D, float eps, bool bf16,
                    void* stream);
int rmsnorm_backward(const void* x, const void* w, const float* r, const void* dy, void* dx, float* dw_partial,
                     int64_t rows, int64_t D, int64_t row_block, bool bf16, void* stream);

// Half-split RoPE (core/kernels/rope.h) on x [B S H, Dh] with tables [B S, Dh]; sign -1 rotates back.
int rope(const void* x, const void* cos, const void* sin, void* out, int64_t rows, int64_t H, int64_t Dh, float sign,
         bool bf16, void* stream);

// The MoE permutation (core/kernels/moe_permute.h): index tensors int64 on the device, N rows, T
// tokens, K slots per token, rows of D.
int moe_permute(const void* x_TD, const int64_t* slot_of_row, void* x_ND, int64_t N, int64_t D, int64_t K, bool bf16,
                void* stream);
int moe_permute_backward(const void* dx_ND, const int64_t* row_of_slot, void* dx_TD, int64_t T, int64_t D, int64_t K,
                         bool bf16, void* stream);
int moe_combine(const void* y_ND, const int64_t* row_of_slot, const void* w_A, void* y_TD, int64_t T, int64_t D, int64_t K,
                bool bf16, void* stream);
int moe_combine_backward(const void* dy_TD, const void* y_ND, const int64_t* slot_of_row, const int64_t* row_of_slot,
                         const void* w_A, void* dy_ND, void* dw_A, int64_t N, int64_t T, int64_t D, int64_t K, bool bf16,
                         void* stream);

// Cross-entropy rows (core/kernels/cross_entropy.h): logits [rows, V] overwritten by their
// gradient when `grad`; loss [rows] fp32; labels int64, scale fp32, on the device.
int cross_entropy_rows(void* logits, int64_t rows, int64_t V, const int64_t* labels, const float* scale, float* loss,
                       bool grad, bool bf16, void* stream);

// AdamW (core/kernels/adamw.h): one launch over `num_chunks` chunks, the table on the device.
int adamw(const AdamWChunk* chunks, int64_t num_chunks, const AdamWScalars& s, void* stream);

}  // namespace moeforge::kernels::cuda
