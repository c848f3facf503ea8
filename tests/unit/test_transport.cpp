// Note [Transport] (parallel/comm/communicator.h): both ends of every point-to-point message use the
// same transport, decided by the call, never by each rank's own tensor. Two ranks run in one
// process over a loopback communicator pair that records what each end chose.
#include "parallel/comm/communicator.h"
#include "parallel/pipeline.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

using namespace moeforge;
using Catch::Matchers::Contains;

namespace {

// What one end of a message did: (send or recv, transport, elements).
struct Event {
  bool send;
  Transport transport;
  int64_t numel;
  bool operator==(const Event&) const = default;
};

// Two ranks' mailboxes; rank r sends into box[1 - r] and receives from box[r].
struct Loopback {
  std::mutex mutex;
  std::condition_variable ready;
  std::deque<torch::Tensor> box[2];
  std::vector<Event> log[2];
};

class LoopbackCommunicator : public Communicator {
 public:
  LoopbackCommunicator(Loopback& wire, int rank) : wire_(wire), rank_(rank), ranks_{0, 1} {}
  int rank() const override { return rank_; }
  int size() const override { return 2; }
  const std::string& name() const override { return name_; }
  const std::vector<int>& world_ranks() const override { return ranks_; }
  void send(const torch::Tensor& t, int peer, int, Transport transport) override {
    check_transport(t, transport, "send", name_);
    std::lock_guard lock(wire_.mutex);
    wire_.box[peer].push_back(t.clone());
    wire_.log[rank_].push_back({true, transport, t.numel()});
    wire_.ready.notify_all();
  }
  void recv(torch::Tensor& t, int, int, Transport transport) override {
    check_transport(t, transport, "recv", name_);
    std::unique_lock lock(wire_.mutex);
    wire_.ready.wait(lock, [&] { return !wire_.box[rank_].empty(); });
    const auto got = wire_.box[rank_].front();
    wire_.box[rank_].pop_front();
    REQUIRE(got.sizes() == t.sizes());
    t.copy_(got);
    wire_.log[rank_].push_back({false, transport, t.numel()});
  }
  void send_recv(const torch::Tensor& s, int send_peer, torch::Tensor& r, int recv_peer, int tag,
                 Transport transport) override {
    send(s, send_peer, tag, transport);
    recv(r, recv_peer, tag, transport);
  }
  // The tests below use point-to-point calls only.
  void all_reduce(torch::Tensor&, ReduceOp) override { unused(); }
  torch::Tensor all_gather(const torch::Tensor&) override { unused(); }
  torch::Tensor reduce_scatter(const torch::Tensor&, ReduceOp) override { unused(); }
  torch::Tensor all_to_all(const torch::Tensor&, const std::vector<int64_t>&, const std::vector<int64_t>&) override { unused(); }
  void broadcast(torch::Tensor&, int) override { unused(); }
  void barrier() override {}

 private:
  [[noreturn]] static void unused() { throw std::logic_error("LoopbackCommunicator: collective not supported"); }
  Loopback& wire_;
  int rank_;
  std::string name_ = "pp";
  std::vector<int> ranks_;
};

// Every message's send on one rank meets a receive of the same transport and size on the other.
void check_paired(const Loopback& wire) {
  std::vector<Event> sent[2], received[2];
  for (int r = 0; r < 2; ++r) {
    for (const auto& e : wire.log[r]) (e.send ? sent : received)[r].push_back(e);
  }
  for (int r = 0; r < 2; ++r) {
    REQUIRE(sent[r].size() == received[1 - r].size());
    for (size_t i = 0; i < sent[r].size(); ++i) {
      CHECK(sent[r][i].transport == received[1 - r][i].transport);
      CHECK(sent[r][i].numel == received[1 - r][i].numel);
    }
  }
}

}  // namespace

TEST_CASE("a checkpoint gather moves every tensor in host memory, on both ends", "[comm][transport]") {
  Loopback wire;
  NamedTensors first{{"embed_tokens.weight", torch::arange(6, torch::kFloat32).reshape({2, 3})}};
  NamedTensors second{{"layers.1.mlp.down_proj.weight", torch::full({4, 2}, 2.5, torch::kBFloat16)},
                      {"exp_avg.norm.weight", torch::ones({5}, torch::kFloat32)}};
  std::thread stage1([&] {
    LoopbackCommunicator pp(wire, 1);
    gather_to_first_stage(second, pp);
  });
  LoopbackCommunicator pp(wire, 0);
  gather_to_first_stage(first, pp);
  stage1.join();
  REQUIRE(first.size() == 3);
  CHECK(first[1].first == "layers.1.mlp.down_proj.weight");
  CHECK(first[1].second.scalar_type() == torch::kBFloat16);
  CHECK(torch::equal(first[1].second, second[0].second));
  CHECK(torch::equal(first[2].second, second[1].second));
  check_paired(wire);
  for (const auto& log : wire.log) {
    for (const auto& e : log) CHECK(e.transport == Transport::host);
  }
}

TEST_CASE("the pipeline's messages use the transport of the device the run trains on", "[comm][transport][pipeline]") {
  Loopback wire;
  const std::vector<int64_t> shape{2, 3};
  auto run_stage = [&](int rank, std::vector<torch::Tensor>& grads) {
    LoopbackCommunicator pp(wire, rank);
    auto w = torch::full(shape, rank + 1.0, torch::requires_grad());
    StageCallbacks callbacks;
    callbacks.forward = [&](const PipelineSlot&, const torch::Tensor& input) {
      StageOutput out;
      if (rank == 0) {
        out.output = torch::ones(shape) * w;
      } else {
        out.loss = (input * w).sum();
      }
      return out;
    };
    callbacks.after_backward = [&](const PipelineSlot&) { grads.push_back(w.grad().clone()); };
    StepTimer timer(torch::kCPU);
    run_pipeline(pp, 1, 3, false, shape, torch::TensorOptions().dtype(torch::kFloat32), callbacks, &timer);
  };
  std::vector<torch::Tensor> grads0, grads1;
  std::thread stage1([&] { run_stage(1, grads1); });
  run_stage(0, grads0);
  stage1.join();
  check_paired(wire);
  for (const auto& log : wire.log) {
    for (const auto& e : log) CHECK(e.transport == transport_for(torch::kCPU));
  }
  // d(sum(input * w1)) / d w0 = w1 per element; accumulated over 3 micro-batches.
  CHECK(torch::allclose(grads0.back(), torch::full(shape, 3 * 2.0)));
}

// The loopback delivers messages in order whatever their kind (as NCCL, which has no tags), so
// this also proves the interleaved schedule's exchanges pair up by order alone.
TEST_CASE("an interleaved pipeline of 2 ranks x 2 chunks routes every micro-batch through the 4 chunks in order",
          "[comm][pipeline]") {
  Loopback wire;
  const std::vector<int64_t> shape{2, 3};
  const int64_t M = 4;
  // Virtual stage v = chunk * 2 + rank multiplies by w_v = v + 1; micro-batch i enters as i + 1.
  auto expected_input = [](int64_t v, int64_t i) {
    double x = static_cast<double>(i + 1);
    for (int64_t u = 0; u < v; ++u) x *= static_cast<double>(u + 1);
    return x;
  };
  auto run_stage = [&](int rank, std::vector<std::string>& errors, std::vector<torch::Tensor>& grads) {
    LoopbackCommunicator pp(wire, rank);
    std::vector<torch::Tensor> w;
    for (int64_t c = 0; c < 2; ++c) w.push_back(torch::full(shape, static_cast<double>(c * 2 + rank + 1), torch::requires_grad()));
    std::vector<int64_t> next_forward(2, 0), next_backward(2, 0);
    StageCallbacks callbacks;
    callbacks.forward = [&](const PipelineSlot& s, const torch::Tensor& input) {
      const int64_t v = s.chunk * 2 + rank;
      if (s.micro_batch != next_forward[static_cast<size_t>(s.chunk)]++) errors.push_back("forward out of order");
      const auto x = v == 0 ? torch::full(shape, static_cast<double>(s.micro_batch + 1)) : input;
      if (!torch::allclose(x, torch::full(shape, expected_input(v, s.micro_batch)))) {
        errors.push_back(fmt::format("virtual stage {} micro-batch {}: wrong input", v, s.micro_batch));
      }
      StageOutput out;
      const auto y = x * w[static_cast<size_t>(s.chunk)];
      if (v == 3) {
        out.loss = y.sum();
      } else {
        out.output = y;
      }
      return out;
    };
    callbacks.after_backward = [&](const PipelineSlot& s) {
      if (s.micro_batch != next_backward[static_cast<size_t>(s.chunk)]++) errors.push_back("backward out of order");
    };
    run_pipeline(pp, 2, M, false, shape, torch::TensorOptions().dtype(torch::kFloat32), callbacks, nullptr);
    for (const auto& t : w) grads.push_back(t.grad());
  };
  std::vector<std::string> errors0, errors1;
  std::vector<torch::Tensor> grads0, grads1;
  std::thread stage1([&] { run_stage(1, errors1, grads1); });
  run_stage(0, errors0, grads0);
  stage1.join();
  CHECK(errors0.empty());
  CHECK(errors1.empty());
  check_paired(wire);
  // loss_i = (i + 1) * w0 w1 w2 w3 per element: d/dw_v summed over i = 10 * 24 / w_v.
  for (int64_t v = 0; v < 4; ++v) {
    const auto& g = (v % 2 == 0 ? grads0 : grads1)[static_cast<size_t>(v / 2)];
    REQUIRE(g.defined());
    CHECK(torch::allclose(g, torch::full(shape, 10.0 * 24.0 / static_cast<double>(v + 1))));
  }
}

TEST_CASE("a tensor that does not live where the call's transport moves it is refused, naming the call",
          "[comm][transport][errors]") {
  const auto cpu = torch::zeros({4});
  CHECK_NOTHROW(check_transport(cpu, Transport::host, "send", "pp"));
  CHECK_THROWS_WITH(check_transport(cpu, Transport::device, "recv", "pp"),
                    Contains("recv on group pp: the call moves device memory but the tensor is on cpu"));
  CHECK(transport_for(torch::Device(torch::kCUDA, 0)) == Transport::device);
  CHECK(transport_for(torch::kCPU) == Transport::host);
}
