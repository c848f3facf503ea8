// defines: attach_main_grad, detach_main_grad, linear, grouped_linear, accumulate_wgrad,
//          fused_wgrad_key, add_to_main_grad, MixedAccumulate, probe_mixed_accumulate
//
// Gradient-accumulation fusion (Megatron's --gradient-accumulation-fusion): a bf16 weight's
// gradient GEMM writes straight into the fp32 main_grad its optimizer keeps, accumulating in fp32,
// instead of producing a bf16 gradient that is rounded, stored and then added into main_grad.
// Each micro-batch's weight gradient is thus never rounded to bf16 (Megatron's precision), and the
// bf16 .grad of those weights (2 bytes a parameter, written, read and freed per micro-batch) never
// exists. On CUDA the GEMM is cuBLAS with bf16 inputs and an fp32 output accumulated in place
// (at::addmm with out_dtype, where this LibTorch accepts it: probe_mixed_accumulate); on the CPU, where LibTorch has no such GEMM, the inputs are widened to
// fp32 first (exact, about twice the time of the bf16 weight GEMM there).
//
// The optimizer attaches each bf16 weight's accumulator (attach_main_grad) and is told after each
// fused addition (`added`: for its overlapped reductions, a fused weight's gradient never reaches
// a post-accumulate-grad hook). The ops below fuse a weight only when it is attached, requires a
// gradient, is bf16 and the kernel is fused on its device; otherwise they are the plain LibTorch
// ops, gradients in .grad. The model calls them for weights it uses exactly once per forward (the
// readiness signal is per use): a tied embedding, used twice, goes through the plain ops.
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

namespace moeforge::kernels {

// From now on the fused ops add `weight`'s gradient into `main_grad_fp32` (fp32, weight's shape,
// contiguous) and then call `added`. `owner` identifies the attachment: detach_main_grad with
// another owner leaves it alone.
void attach_main_grad(const torch::Tensor& weight, torch::Tensor main_grad_fp32, std::function<void()> added,
                      const void* owner);
void detach_main_grad(const torch::Tensor& weight, const void* owner);

// y = x W^T (+ b), W [out, in], x [..., in]: torch::linear's math.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias = {});

// The routed experts' products: rows [offs[e-1], offs[e]) of x_NJ times weight_EMJ[e]^T, i.e.
// grouped_mm(x_NJ, weight_EMJ.transpose(1, 2), offs_E); rows_per_expert are the same groups on the
// host (the fused weight gradient goes expert by expert).
torch::Tensor grouped_linear(const torch::Tensor& x_NJ, const torch::Tensor& weight_EMJ, const torch::Tensor& offs_E,
                             const std::vector<int64_t>& rows_per_expert);

// main_grad_MJ += g_NM^T x_NJ in fp32 (g, x of one dtype), the fused weight gradient itself.
void accumulate_wgrad(torch::Tensor& main_grad_MJ, const torch::Tensor& g_NM, const torch::Tensor& x_NJ);

// How an accelerator adds a bf16 product into an fp32 main_grad. The one fused call (addmm with an
// fp32 out_dtype) is not accepted by every LibTorch's kernel (2.8 and 2.9's CUDA refused it at run
// time); the fallbacks cost memory: an fp32 product the size of the weight (mm_dtype_add), or fp32
// copies of both inputs (widen, always available, the CPU's way).
enum class MixedAccumulate { addmm_dtype, mm_dtype_add, widen };
const char* mixed_accumulate_name(MixedAccumulate mode);
// main_grad_MJ += g_NM^T x_NJ the given way (bf16 g and x, fp32 main_grad).
void accumulate_mixed(MixedAccumulate mode, torch::Tensor& main_grad_MJ, const torch::Tensor& g_NM,
                      const torch::Tensor& x_NJ);
// Tries each way on `device`, best first, on small exact operands, and keeps the first that runs and
// agrees with the host's product for accumulate_wgrad off the CPU (process-wide, until the next
// probe). Returns what was refused and what it costs, empty when the fused call works.
std::string probe_mixed_accumulate(const torch::Device& device);
MixedAccumulate mixed_accumulate_mode();

// For ops that make a weight's gradient themselves (the LM head with the loss): at the forward, the
// key of `weight` when its gradient is fused now (0: it is not); at the backward, `add` applied to
// its main_grad and the owner told (false and nothing done when it was detached since).
int64_t fused_wgrad_key(const torch::Tensor& weight);
bool add_to_main_grad(int64_t key, const std::function<void(torch::Tensor& main_grad)>& add);

}  // namespace moeforge::kernels
