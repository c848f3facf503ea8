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

// Along the sequence (dim 1): the communicators gather and scatter along dim 0.
torch::Tensor gathered_sequence(const torch::Tensor& x_BsD, Communicator& tp) {
  return tp.all_gather(x_BsD.transpose(0, 1).contiguous()).transpose(0, 1).contiguous();
}
torch::Tensor scattered_sequence(const torch::Tensor& y_BSD, Communicator& tp) {
  return tp.reduce_scatter(y_BSD.transpose(0, 1).contiguous(), ReduceOp::sum).transpose(0, 1).contiguous();
}

using SequenceOp = torch::Tensor (*)(const torch::Tensor&, Communicator&);

// Forward one exchange along the sequence, backward its adjoint: Gather (the chunks all-gathered
// into the sequence; the gradient reduce-scattered) and Scatter (the partial outputs
// reduce-scattered; the gradient chunks all-gathered).
template <SequenceOp Forward, SequenceOp Backward>
struct SequenceExchange : torch::autograd::Function<SequenceExchange<Forward, Backward>> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, int64_t tp) {
    ctx->saved_data["tp"] = tp;
    return Forward(x, group(tp));
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::tensor_list grads) {
    return {Backward(grads[0], group(ctx->saved_data["tp"].toInt())), torch::Tensor()};
  }
};
using Gather = SequenceExchange<gathered_sequence, scattered_sequence>;
using Scatter = SequenceExchange<scattered_sequence, gathered_sequence>;

// Forward: the gathered sequence itself (a view of it, no copy); backward: this rank's chunk of
// the gradient.
struct WholeView : torch::autograd::Function<WholeView> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& /*x*/,
                               const torch::Tensor& gathered, int64_t rank, int64_t size) {
    ctx->saved_data["rank"] = rank;
    ctx->saved_data["size"] = size;
    return gathered;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::tensor_list grads) {
    const int64_t size = ctx->saved_data["size"].toInt(), chunk = grads[0].size(1) / size;
    return {grads[0].narrow(1, ctx->saved_data["rank"].toInt() * chunk, chunk), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
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

torch::Tensor gather_sequence_parallel(const torch::Tensor& x_BsD, const std::shared_ptr<Communicator>& tp) {
  return Gather::apply(x_BsD, handle(tp));
}

torch::Tensor scatter_sequence_parallel(const torch::Tensor& y_BSD, const std::shared_ptr<Communicator>& tp) {
  return Scatter::apply(y_BSD, handle(tp));
}

torch::Tensor sequence_parallel_whole(const torch::Tensor& x_BsD, const torch::Tensor& gathered_BSD, int64_t rank,
                                      int64_t size) {
  return WholeView::apply(x_BsD, gathered_BSD.detach(), rank, size);
}

}  // namespace moeforge
