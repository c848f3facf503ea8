// defines: rope, rope_reference
//
// Half-split rotary embedding (Hugging Face's rotate_half) on q or k laid out [B, S, H, Dh] (the
// projection's output before the heads move forward), with tables cos/sin [B, S, Dh] whose halves
// are equal: out = x cos + rotate_half(x) sin. Fused: one pass each way (the backward is the
// rotation by the opposite angle), where the reference narrows, negates, concatenates, multiplies
// and adds, and its backward fills zeros for each narrowed half. The tables take no gradient.
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include <torch/torch.h>

namespace moeforge::kernels {

torch::Tensor rope(const torch::Tensor& x_BSHDh, const torch::Tensor& cos_BSDh, const torch::Tensor& sin_BSDh);
torch::Tensor rope_reference(const torch::Tensor& x_BSHDh, const torch::Tensor& cos_BSDh, const torch::Tensor& sin_BSDh);
torch::Tensor rope_fused(const torch::Tensor& x_BSHDh, const torch::Tensor& cos_BSDh, const torch::Tensor& sin_BSDh);

}  // namespace moeforge::kernels
