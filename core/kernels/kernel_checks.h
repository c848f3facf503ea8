// defines: CheckShapes, startup_shapes, conformance_shapes, CheckRow, CheckConfig, check_tolerance,
//          run_kernel_checks, kernel_from_name, kernel_names
//
// One comparison of each fused kernel against its reference composition, at a set of shapes: the
// start-up self-check (self_check.h) runs it at its small shapes, `moeforge check kernels`
// (launch/commands/check_command.cpp, docs/kernels.md) at those and at odd, empty and the mission's
// real widths. Both take their comparison (norm-wise error of the output and of every input's
// gradient) and tolerances from here, so the command judges a kernel as training does.
#pragma once

#include "core/kernels/kernels.h"

#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

namespace moeforge::kernels {

// The sizes one pass of the checks uses. T tokens (rows), D hidden, E experts, K top-k, F an
// expert's width, S the shared expert's width, V the vocabulary.
struct CheckShapes {
  std::string name;  // start-up, odd, empty, mission
  int64_t tokens = 24, hidden = 32, experts = 4, top_k = 2;
  int64_t ffn = 40, shared_ffn = 40;
  int64_t vocab = 50, head_hidden = 32, ce_chunk = 5;  // the LM head's width and its rows per chunk
  std::vector<int64_t> rope_BSHD{2, 6, 3, 16};         // batch, sequence, heads, head dim
  std::vector<int64_t> gemm_rows{7, 0, 9, 8};          // rows per expert of the grouped GEMM
  int64_t gemm_out = 32;                               // its output width (its input is `hidden`)
  std::vector<int64_t> adamw_sizes{1000, 37};          // the last one also has a bf16 copy
  int64_t wgrad_rows = 24, wgrad_out = 24;             // rows per micro-batch, the linear's outputs
  int64_t wgrad_expert_out = 16;                       // the grouped experts' outputs (E of them)
};

// The start-up self-check's shapes (small: the 17 checks take tens of milliseconds on a CPU).
CheckShapes startup_shapes();
// The command's: the start-up shapes, then odd sizes, zero rows, and the mission's widths at a few rows.
std::vector<CheckShapes> conformance_shapes();

// One comparison: a kernel's function on one dtype and shape.
struct CheckRow {
  Kernel kernel;
  std::string op;     // the function checked (swiglu has two, permute a permute and a combine)
  std::string dtype;  // fp32 | bf16
  std::string shape;  // the inputs' shapes
  double forward_error = 0;    // norm-wise |a - b| / |b| of the output (NaN: not compared, see detail)
  double gradient_error = 0;   // the worst over every input's gradient (NaN: none, e.g. AdamW)
  double tolerance = 0;
  bool ok = true;
  std::string detail;  // what else was compared, or the exception
};

// Norm-wise error allowed per dtype: a detector of a broken kernel, not a precision test
// (tests/unit/test_kernels.cpp is that).
double check_tolerance(torch::ScalarType dtype);

struct CheckConfig {
  std::vector<torch::ScalarType> dtypes{torch::kFloat32, torch::kBFloat16};
  // The forced failure of `moeforge check kernels` (MOEFORGE_CHECK_KERNELS_FAIL): this kernel's
  // fused result is scaled by 1.5 before the comparison, so the comparison itself fails.
  std::optional<Kernel> perturb;
};

// Every kernel fused on device.type() at `shapes`, each dtype of `config` it runs in (AdamW: fp32
// with a bf16 copy; the fused weight gradient: bf16). An exception fails its row; on CUDA each check
// synchronises the device so that a fault is that kernel's (a sticky one throws).
std::vector<CheckRow> run_kernel_checks(const torch::Device& device, const CheckShapes& shapes,
                                        const CheckConfig& config = {});

// "rmsnorm" -> Kernel::rmsnorm; nullopt for an unknown name.
std::optional<Kernel> kernel_from_name(const std::string& name);
// Every kernel's name, comma-separated, for messages.
std::string kernel_names();

}  // namespace moeforge::kernels
