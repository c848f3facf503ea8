// defines: swiglu, swiglu_reference
//
// The SwiGLU activation straight from a SwiGLU FFN's fused gate/up product (the routed experts'
// gate_up_proj: gate rows first, then up): for gate_up [N, 2F], y [N, F] = silu(gate) * up.
// Fused: one pass forward; one pass backward that writes d(gate_up) [N, 2F] directly, where the
// reference's chunk() makes each half's backward allocate and fill a zero tensor of the whole.
//   backward: s = sigmoid(g), d gate = dy * up * s * (1 + g (1 - s)), d up = dy * g * s
#pragma once

#include <torch/torch.h>

namespace moeforge::kernels {

// Fused (kernels::fused(Kernel::swiglu, device)) or the reference; gate_up [..., 2F].
torch::Tensor swiglu(const torch::Tensor& gate_up);
// The same from separate gate and up products [..., F] (the dense MLP and the shared expert).
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);
// silu(gate) * up (over chunk(2, -1) for one tensor): the LibTorch composition, the oracle.
torch::Tensor swiglu_reference(const torch::Tensor& gate_up);
torch::Tensor swiglu_reference(const torch::Tensor& gate, const torch::Tensor& up);
// The kernel alone, whatever the switch says (for tests and benchmarks); CPU or CUDA tensors.
torch::Tensor swiglu_fused(const torch::Tensor& gate_up);
torch::Tensor swiglu_fused(const torch::Tensor& gate, const torch::Tensor& up);

}  // namespace moeforge::kernels
