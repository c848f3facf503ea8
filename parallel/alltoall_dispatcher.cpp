#include "parallel/alltoall_dispatcher.h"

#include "core/device/host_sync.h"
#include "core/kernels/moe_permute.h"

#include <chrono>

namespace moeforge {

using moe::Dispatched;

namespace {

using Clock = std::chrono::steady_clock;

// One uneven row all-to-all, split over two autograd nodes so that what the caller records between
// them overlaps it, forward and backward. Forward: ExchangeStart starts it, ExchangeFinish waits
// for it. Backward, in reverse: ExchangeFinish starts the reverse exchange of the gradient (what
// was received goes back where it came from), ExchangeStart waits for it. The autograd engine
// runs ready nodes latest-created first, so the nodes created between the two (the shared
// expert's) run between them in the backward as well. Without overlap the exchange runs blocking
// inside the starting node: the same graph, so the same floating-point results.
struct PendingExchange : torch::CustomClassHolder {
  Communicator* group = nullptr;
  DispatchStats* stats = nullptr;
  std::shared_ptr<ComputeBeforeAllToAll> clock;  // may be null
  bool overlap = false;
  std::vector<int64_t> send_rows, recv_rows;  // of the forward direction
  torch::Tensor out;
  std::shared_ptr<Work> work;

  void start(const torch::Tensor& x, bool reverse) {
    if (clock) clock->before();
    const auto t0 = Clock::now();
    const auto& send = reverse ? recv_rows : send_rows;
    const auto& recv = reverse ? send_rows : recv_rows;
    if (overlap) {
      work = group->all_to_all_async(x.contiguous(), out, send, recv);
    } else {
      out = group->all_to_all(x.contiguous(), send, recv);
      work = completed_work();
      if (clock) clock->after();
    }
    int64_t remote = 0;
    for (size_t p = 0; p < send.size(); ++p) {
      if (static_cast<int>(p) != group->rank()) remote += send[p];
    }
    stats->bytes_sent += remote * (x.dim() > 1 ? x.size(1) : 1) * static_cast<int64_t>(x.element_size());
    stats->seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  }

  torch::Tensor finish() {
    const auto t0 = Clock::now();
    work->wait();
    work.reset();
    // Overlapped: the exchange ends for the compute thread here (the shared expert ran meanwhile).
    if (clock && overlap) clock->after();
    stats->seconds += std::chrono::duration<double>(Clock::now() - t0).count();
    return std::move(out);
  }
};

c10::intrusive_ptr<PendingExchange> pending_of(torch::autograd::AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<PendingExchange>(ctx->saved_data["pending"].toCapsule());
}

// x_ND -> an empty token that orders ExchangeFinish after it.
class ExchangeStart : public torch::autograd::Function<ExchangeStart> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_ND,
                               const c10::intrusive_ptr<PendingExchange>& pending) {
    ctx->saved_data["pending"] = c10::IValue::make_capsule(pending);
    pending->start(x_ND, /*reverse=*/false);
    return torch::empty({0}, x_ND.options());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list) {
    return {pending_of(ctx)->finish(), {}};
  }
};

// token -> the rows received.
class ExchangeFinish : public torch::autograd::Function<ExchangeFinish> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& /*token*/,
                               const c10::intrusive_ptr<PendingExchange>& pending) {
    ctx->saved_data["pending"] = c10::IValue::make_capsule(pending);
    return pending->finish();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    pending_of(ctx)->start(grads[0], /*reverse=*/true);
    return {torch::empty({0}, grads[0].options()), {}};
  }
};

// Of host tensors (the counts exchanged over the CPU path): no device read.
std::vector<int64_t> host_vector(const torch::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "host_vector: counts must be host tensors");
  const auto c = t.to(torch::kInt64).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

}  // namespace

AllToAllDispatcher::AllToAllDispatcher(int64_t num_experts, std::shared_ptr<Communicator> ep_group, bool overlap)
    : num_experts_(num_experts), ep_(std::move(ep_group)), overlap_(overlap) {}

torch::Tensor AllToAllDispatcher::exchange(const torch::Tensor& x_ND, const std::vector<int64_t>& send_rows,
                                           const std::vector<int64_t>& recv_rows, const moe::Overlapped& overlapped) {
  auto pending = c10::make_intrusive<PendingExchange>();
  pending->group = ep_.get();
  pending->stats = stats_.get();
  pending->clock = clock_;
  pending->overlap = overlap_;
  pending->send_rows = send_rows;
  pending->recv_rows = recv_rows;
  const auto token = ExchangeStart::apply(x_ND, pending);
  if (overlapped) overlapped();
  return ExchangeFinish::apply(token, pending);
}

Dispatched AllToAllDispatcher::dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK,
                                        const moe::Overlapped& overlapped) {
  const int64_t E = num_experts_;
  const int64_t P = ep_->size();
  const int64_t L = E / P;
  // 1. Sorted by global expert: grouped by destination rank, then by its local expert.
  Dispatched d = moe::sort_by_expert(x_TD, experts_TK, E);
  const auto x_send = d.x_ND;

  // 2. Counts: row p of send_Re is what this rank sends to rank p's L experts.
  if (clock_) clock_->before();
  const auto t0 = Clock::now();
  // host: the counts travel over the host path (they size the row exchange).
  const auto send_Re = torch::tensor(d.rows_per_local_expert, torch::kInt64).reshape({P, L});
  const auto recv_Re = ep_->all_to_all(send_Re, std::vector<int64_t>(P, 1), std::vector<int64_t>(P, 1));
  stats_->seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  if (clock_) clock_->after();
  d.send_rows = host_vector(send_Re.sum(1));
  d.recv_rows = host_vector(recv_Re.sum(1));
  d.rows_per_local_expert = host_vector(recv_Re.sum(0));

  // 3. Rows, then regrouped from (source rank, local expert) order to (local expert, source rank).
  const auto x_recv = exchange(x_send, d.send_rows, d.recv_rows, overlapped);
  const auto local_expert_N =
      to_device(torch::repeat_interleave(torch::arange(L).repeat({P}), recv_Re.reshape({-1})), x_TD.device());
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

torch::Tensor AllToAllDispatcher::combine(const torch::Tensor& y_ND, const Dispatched& d, const torch::Tensor& weights_TK,
                                          const moe::Overlapped& overlapped) {
  // Inverse of the regrouping, back to the ranks, then the tokens, weighted.
  const auto y_recv = kernels::moe_permute(y_ND, d.ungroup_N, d.regroup_N, 1);
  return moe::weighted_unsort(exchange(y_recv, d.recv_rows, d.send_rows, overlapped), d, weights_TK);
}

}  // namespace moeforge
