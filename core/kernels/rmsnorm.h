// defines: rms_norm, rms_norm_reference
//
// RMSNorm as Hugging Face's Qwen2/Llama: in fp32 whatever the input dtype, y = w * (x / rms(x))
// with the normalized row cast back to the input dtype before the weight multiplies it. Fused: one
// pass forward (the row's 1/rms kept, 4 bytes a row), one pass backward for dx and a deterministic
// reduction over rows for dw (fixed blocks of rows, summed in order), where the reference runs
// about six elementwise passes each way.
#pragma once

#include <torch/torch.h>

namespace moeforge::kernels {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);  // fused or reference
torch::Tensor rms_norm_reference(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor rms_norm_fused(const torch::Tensor& x, const torch::Tensor& weight, double eps);

}  // namespace moeforge::kernels
