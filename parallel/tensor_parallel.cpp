#include "parallel/tensor_parallel.h"

#include <torch/autograd.h>

namespace moeforge {

namespace {

torch::Tensor summed(const torch::Tensor& t, Communicator& tp) {
  auto out = t.contiguous().clone();
  tp.all_reduce(out, ReduceOp::sum);
  return out;
}

// The group travels through autograd as an integer: the communicators live as long as the run.
int64_t handle(const std::shared_ptr<Communicator>& tp) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(tp.get())); }
Communicator& group(int64_t handle) { return *reinterpret_cast<Communicator*>(static_cast<intptr_t>(handle)); }

// Forward as it is; backward: the gradient summed over the TP ranks.
struct Enter : torch::autograd::Function<Enter> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, int64_t tp) {
    ctx->saved_data["tp"] = tp;
    return x;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::tensor_list grads) {
    return {summed(grads[0], group(ctx->saved_data["tp"].toInt())), torch::Tensor()};
  }
};

// Forward: the partial outputs summed over the TP ranks; backward as it is.
struct Leave : torch::autograd::Function<Leave> {
  static torch::Tensor forward(torch::autograd::AutogradContext* /*ctx*/, const torch::Tensor& y, int64_t tp) {
    return summed(y, group(tp));
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* /*ctx*/, torch::autograd::tensor_list grads) {
    return {grads[0], torch::Tensor()};
  }
};

}  // namespace

torch::Tensor tensor_parallel_part(const torch::Tensor& whole, const TensorParallelCut& cut, int64_t rank, int64_t size) {
  if (!cut.splits() || size == 1) return whole;
  if (!cut.halves) return whole.chunk(size, cut.dim)[rank];
  const auto halves = whole.chunk(2, cut.dim);
  return torch::cat({halves[0].chunk(size, cut.dim)[rank], halves[1].chunk(size, cut.dim)[rank]}, cut.dim);
}

torch::Tensor tensor_parallel_join(const std::vector<torch::Tensor>& parts, const TensorParallelCut& cut) {
  if (!cut.splits() || parts.size() == 1) return parts.front();
  if (!cut.halves) return torch::cat(parts, cut.dim);
  std::vector<torch::Tensor> firsts, seconds;
  for (const auto& p : parts) {
    const auto halves = p.chunk(2, cut.dim);
    firsts.push_back(halves[0]);
    seconds.push_back(halves[1]);
  }
  return torch::cat({torch::cat(firsts, cut.dim), torch::cat(seconds, cut.dim)}, cut.dim);
}

torch::Tensor enter_tensor_parallel(const torch::Tensor& x, const std::shared_ptr<Communicator>& tp) {
  return Enter::apply(x, handle(tp));
}

torch::Tensor leave_tensor_parallel(const torch::Tensor& y, const std::shared_ptr<Communicator>& tp) {
  return Leave::apply(y, handle(tp));
}

}  // namespace moeforge
