#include "core/kernels/grouped_gemm.h"

#include "core/device/host_sync.h"
#include "core/kernels/kernels.h"

#include <fmt/format.h>

#include <map>
#include <mutex>
#include <numeric>

namespace moeforge::kernels {

namespace {

// Identity whose backward hands on a contiguous gradient: _grouped_mm's backward refuses an
// expanded one (e.g. from a sum).
class ContiguousGrad : public torch::autograd::Function<ContiguousGrad> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x) { return x; }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*, torch::autograd::variable_list g) {
    return {g[0].contiguous()};
  }
};

// Does at::_grouped_mm run, forward and backward, on this device and dtype? Tried once on a tiny
// input; the answer is kept.
bool probe(const torch::TensorOptions& options) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, bool> known;
  const auto key = std::pair{static_cast<int>(options.device().type()), static_cast<int>(options.dtype().toScalarType())};
  std::lock_guard lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  bool ok = true;
  try {
    torch::AutoGradMode grad(true);
    const auto x = torch::ones({3, 16}, options).requires_grad_(true);
    const auto w = torch::ones({2, 16, 16}, options).requires_grad_(true);
    const auto offs = torch::tensor({1, 3}, torch::TensorOptions().dtype(torch::kInt32).device(options.device()));
    at::_grouped_mm(x, w, offs).backward(torch::ones({3, 16}, options));
  } catch (const std::exception& e) {
    ok = false;
    disable(Kernel::grouped_gemm, options.device().type(),
            fmt::format("at::_grouped_mm does not run for {} here ({})", c10::toString(options.dtype().toScalarType()),
                        std::string(e.what()).substr(0, 200)));
  }
  known.emplace(key, ok);
  return ok;
}

}  // namespace

bool grouped_mm_usable(const torch::Tensor& x, const std::vector<int64_t>& dims) {
  if (!fused(Kernel::grouped_gemm, x.device().type())) return false;
  for (const int64_t d : dims) {
    if (d * static_cast<int64_t>(x.element_size()) % 16 != 0) return false;
  }
  const auto dtype = x.scalar_type();
  // CUDA's grouped GEMM is bf16 only; the CPU's takes fp32 and bf16.
  if (dtype != torch::kBFloat16 && !(dtype == torch::kFloat32 && x.device().is_cpu())) return false;
  return probe(x.options());
}

torch::Tensor grouped_mm(const torch::Tensor& x_NJ, const torch::Tensor& w_EJM, const torch::Tensor& offs_E) {
  return ContiguousGrad::apply(at::_grouped_mm(x_NJ, w_EJM, offs_E));
}

torch::Tensor group_offsets(const std::vector<int64_t>& rows, const torch::Device& device) {
  std::vector<int32_t> ends(rows.size());
  int64_t at = 0;
  for (size_t e = 0; e < rows.size(); ++e) ends[e] = static_cast<int32_t>(at += rows[e]);
  return to_device(torch::tensor(ends, torch::kInt32), device);  // pinned: never blocks the host
}

}  // namespace moeforge::kernels
