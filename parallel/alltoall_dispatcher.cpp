#include "parallel/alltoall_dispatcher.h"

#include "core/host_sync.h"
#include "core/kernels/moe_permute.h"

#include <chrono>

namespace moeforge {

using moe::Dispatched;

namespace {

using Clock = std::chrono::steady_clock;

// The uneven row all-to-all as an autograd function: the gradient of the rows received is sent
// back with the counts swapped.
class RowAllToAll : public torch::autograd::Function<RowAllToAll> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_ND, Communicator* group,
                               DispatchStats* stats, const std::vector<int64_t>& send_rows,
                               const std::vector<int64_t>& recv_rows) {
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(group);
    ctx->saved_data["stats"] = reinterpret_cast<int64_t>(stats);
    ctx->saved_data["send_rows"] = send_rows;
    ctx->saved_data["recv_rows"] = recv_rows;
    return exchange(x_ND, *group, stats, send_rows, recv_rows);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* group = reinterpret_cast<Communicator*>(ctx->saved_data["group"].toInt());
    auto* stats = reinterpret_cast<DispatchStats*>(ctx->saved_data["stats"].toInt());
    const auto send_rows = ctx->saved_data["send_rows"].toIntVector();
    const auto recv_rows = ctx->saved_data["recv_rows"].toIntVector();
    // Reverse direction: what was received is sent back to where it came from.
    return {exchange(grads[0], *group, stats, recv_rows, send_rows), {}, {}, {}, {}};
  }

 private:
  static torch::Tensor exchange(const torch::Tensor& x, Communicator& group, DispatchStats* stats,
                                const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows) {
    const auto t0 = Clock::now();
    const auto device = x.device();
    // CPU communicators need contiguous host tensors; the NCCL path keeps them on the device.
    auto out = group.all_to_all(x.contiguous(), send_rows, recv_rows).to(device);
    int64_t remote = 0;
    for (size_t p = 0; p < send_rows.size(); ++p) {
      if (static_cast<int>(p) != group.rank()) remote += send_rows[p];
    }
    stats->bytes_sent += remote * (x.dim() > 1 ? x.size(1) : 1) * static_cast<int64_t>(x.element_size());
    stats->seconds += std::chrono::duration<double>(Clock::now() - t0).count();
    return out;
  }
};

// Of host tensors (the counts exchanged over the CPU path): no device read.
std::vector<int64_t> host_vector(const torch::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "host_vector: counts must be host tensors");
  const auto c = t.to(torch::kInt64).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

}  // namespace

AllToAllDispatcher::AllToAllDispatcher(int64_t num_experts, std::shared_ptr<Communicator> ep_group)
    : num_experts_(num_experts), ep_(std::move(ep_group)) {}

Dispatched AllToAllDispatcher::dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK) {
  const int64_t E = num_experts_;
  const int64_t P = ep_->size();
  const int64_t L = E / P;
  // 1. Sorted by global expert: grouped by destination rank, then by its local expert.
  Dispatched d = moe::sort_by_expert(x_TD, experts_TK, E);
  const auto x_send = d.x_ND;

  // 2. Counts: row p of send_PL is what this rank sends to rank p's L experts.
  const auto t0 = Clock::now();
  // host: the counts travel over the host path (they size the row exchange).
  const auto send_PL = torch::tensor(d.rows_per_local_expert, torch::kInt64).reshape({P, L});
  const auto recv_PL = ep_->all_to_all(send_PL, std::vector<int64_t>(P, 1), std::vector<int64_t>(P, 1));
  stats_->seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  d.send_rows = host_vector(send_PL.sum(1));
  d.recv_rows = host_vector(recv_PL.sum(1));
  d.rows_per_local_expert = host_vector(recv_PL.sum(0));

  // 3. Rows, then regrouped from (source rank, local expert) order to (local expert, source rank).
  const auto x_recv = RowAllToAll::apply(x_send, ep_.get(), stats_.get(), d.send_rows, d.recv_rows);
  const auto local_expert_N =
      to_device(torch::repeat_interleave(torch::arange(L).repeat({P}), recv_PL.reshape({-1})), x_TD.device());
  d.regroup_N = std::get<1>(torch::sort(local_expert_N, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  d.ungroup_N = torch::empty_like(d.regroup_N).index_put_({d.regroup_N}, torch::arange(d.regroup_N.size(0), d.regroup_N.options()));
  // A pure permutation: moe_permute with one slot per row (a gather each way, deterministic).
  d.x_ND = kernels::moe_permute(x_recv, d.regroup_N, d.ungroup_N, 1);

  for (int64_t r : d.recv_rows) stats_->rows_received += r;
  for (int64_t p = 0; p < P; ++p) {
    if (p != ep_->rank()) stats_->rows_sent_remote += d.send_rows[static_cast<size_t>(p)];
  }
  return d;
}

torch::Tensor AllToAllDispatcher::combine(const torch::Tensor& y_ND, const Dispatched& d, const torch::Tensor& weights_TK) {
  // Inverse of the regrouping, back to the ranks, then the tokens, weighted.
  const auto y_recv = kernels::moe_permute(y_ND, d.ungroup_N, d.regroup_N, 1);
  return moe::weighted_unsort(RowAllToAll::apply(y_recv, ep_.get(), stats_.get(), d.recv_rows, d.send_rows), d, weights_TK);
}

}  // namespace moeforge
