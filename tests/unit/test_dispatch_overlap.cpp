// The expert all-to-all overlapped with the shared expert (parallel.overlap_comm): in the forward
// the work the MoE layer hands the dispatcher runs between the start of each row exchange and its
// wait, and in the backward the shared expert's gradients are computed between the start of each
// reverse exchange and its wait (the order the autograd engine gives the dispatcher's two nodes).
// A group of one records the calls; the results equal the blocking dispatcher's bit for bit.
#include "parallel/alltoall_dispatcher.h"

#include <catch2/catch.hpp>

#include <string>
#include <vector>

using namespace moeforge;

namespace {

std::vector<std::string> g_log;

// A group of one whose asynchronous all-to-all says when it starts and when it is waited for.
class RecordingGroup : public LocalCommunicator {
 public:
  std::shared_ptr<Work> all_to_all_async(const torch::Tensor& tensor, torch::Tensor& out, const std::vector<int64_t>& send_rows,
                                         const std::vector<int64_t>& recv_rows) override {
    g_log.push_back("start");
    out = all_to_all(tensor, send_rows, recv_rows);
    return std::make_shared<Logged>();
  }

 private:
  struct Logged : Work {
    void wait() override { g_log.push_back("wait"); }
    bool is_completed() override { return true; }
  };
};

// Identity whose forward and backward are logged under a name.
class Mark : public torch::autograd::Function<Mark> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const std::string& name) {
    ctx->saved_data["name"] = name;
    g_log.push_back(name + " forward");
    return x.clone();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    g_log.push_back(ctx->saved_data["name"].toStringRef() + " backward");
    return {g[0], {}};
  }
};

// A routed layer with a "shared" branch split over the two exchanges, as MoELayer does; returns
// the input's gradient.
torch::Tensor run(moe::Dispatcher& d, const torch::Tensor& x, const torch::Tensor& experts_TK, const torch::Tensor& w_TK) {
  auto x_TD = x.clone().requires_grad_(true);
  torch::Tensor h, s;
  const auto sent = d.dispatch(x_TD, experts_TK, [&] { h = Mark::apply(x_TD * 3, "first"); });
  const auto y_ND = Mark::apply(sent.x_ND * 2, "experts");
  auto y_TD = d.combine(y_ND, sent, w_TK, [&] { s = Mark::apply(h.sin(), "second"); });
  (y_TD + s).pow(2).sum().backward();
  return x_TD.grad();
}

}  // namespace

TEST_CASE("the dispatcher's exchanges are in flight while the shared expert computes, forward and backward",
          "[moe][overlap]") {
  torch::manual_seed(0);
  const auto x = torch::randn({6, 4});
  const auto experts_TK = torch::randint(0, 4, {6, 2});
  const auto w_TK = torch::rand({6, 2});
  auto group = std::make_shared<RecordingGroup>();
  AllToAllDispatcher overlapped(4, group, /*overlap=*/true);
  g_log.clear();
  const auto grad = run(overlapped, x, experts_TK, w_TK);
  const std::vector<std::string> expected{
      // forward: dispatch, experts, combine
      "start", "first forward", "wait", "experts forward", "start", "second forward", "wait",
      // backward: the combine's reverse exchange around the second half's gradient, then the
      // dispatch's around the first half's
      "start", "second backward", "wait", "experts backward", "start", "first backward", "wait"};
  CHECK(g_log == expected);

  AllToAllDispatcher blocking(4, group, /*overlap=*/false);
  g_log.clear();
  CHECK(torch::equal(run(blocking, x, experts_TK, w_TK), grad));
  moe::LocalDispatcher local(4);
  CHECK(torch::allclose(run(local, x, experts_TK, w_TK), grad, 1e-6, 1e-6));
}
