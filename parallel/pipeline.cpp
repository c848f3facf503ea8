#include "parallel/pipeline.h"

#include <cstring>
#include <deque>
#include <sstream>
#include <vector>

namespace moeforge {

namespace {

// Activations go from stage s to s + 1 and gradients back, so the direction of a message tells
// them apart: one tag serves both.
constexpr int kTag = 7;

class Pipe {
 public:
  // Activations and gradients travel where the run trains (both stages have the same device kind).
  // `timer`: where waits are timed (null: untimed, as in evaluation).
  Pipe(Communicator& pp, const std::vector<int64_t>& shape, const torch::TensorOptions& options, StepTimer* timer)
      : pp_(pp), shape_(shape), options_(options), transport_(transport_for(options.device())), timer_(timer) {}
  bool first() const { return pp_.rank() == 0; }
  bool last() const { return pp_.rank() == pp_.size() - 1; }

  torch::Tensor recv_forward(bool grad) {
    if (first()) return {};
    auto x = empty();
    timed([&] { pp_.recv(x, pp_.rank() - 1, kTag, transport_); });
    return grad ? x.requires_grad_(true) : x;
  }
  void send_forward(const torch::Tensor& y) {
    if (last()) return;
    post(y.detach().contiguous(), pp_.rank() + 1);
  }
  torch::Tensor recv_backward() {
    if (last()) return {};
    auto g = empty();
    timed([&] { pp_.recv(g, pp_.rank() + 1, kTag, transport_); });
    return g;
  }
  void send_backward(const torch::Tensor& g) {
    if (first()) return;
    post(g.contiguous(), pp_.rank() - 1);
  }
  // Paired exchanges (send_recv, so neighbours that both send first never wait on each other):
  // the neighbour is in the matching pair, and this stage needs what it receives right away.
  torch::Tensor send_forward_recv_backward(const torch::Tensor& y) {
    if (last()) return {};
    auto g = empty();
    timed([&] { pp_.send_recv(y.detach().contiguous(), pp_.rank() + 1, g, pp_.rank() + 1, kTag, transport_); });
    return g;
  }
  torch::Tensor send_backward_recv_forward(const torch::Tensor& g) {
    if (first()) return {};
    auto x = empty();
    timed([&] { pp_.send_recv(g.contiguous(), pp_.rank() - 1, x, pp_.rank() - 1, kTag, transport_); });
    return x.requires_grad_(true);
  }
  // Every send complete: at the step's end (the only wait for a send).
  void finish_sends() {
    timed([&] {
      for (auto& w : sends_) w->wait();
    });
    sends_.clear();
  }

 private:
  torch::Tensor empty() const { return torch::empty(shape_, options_); }
  // Sends are asynchronous: the stage goes on computing and the handle keeps the tensor until the
  // peer has it. Completed ones are dropped as new ones are posted, which bounds what is held.
  void post(const torch::Tensor& t, int peer) {
    std::erase_if(sends_, [](const std::shared_ptr<Work>& w) { return w->is_completed(); });
    sends_.push_back(pp_.send_async(t, peer, kTag, transport_));
  }
  template <typename F>
  void timed(F&& f) {
    if (!timer_) return f();
    const auto scope = timer_->scope(Phase::pipeline_wait);
    f();
  }
  Communicator& pp_;
  std::vector<int64_t> shape_;
  torch::TensorOptions options_;
  Transport transport_;
  StepTimer* timer_;
  std::vector<std::shared_ptr<Work>> sends_;
};

struct InFlight {
  torch::Tensor input, output, loss;
};

}  // namespace

void run_1f1b(Communicator& pp, int64_t micro_batches, const std::vector<int64_t>& activation_shape,
              const torch::TensorOptions& options, const StageCallbacks& callbacks, StepTimer& timer) {
  Pipe pipe(pp, activation_shape, options, &timer);
  std::deque<InFlight> in_flight;
  int64_t next = 0, backwards = 0;

  auto forward = [&](const torch::Tensor& input) {
    timer.start(Phase::forward);
    StageOutput out = callbacks.forward(next++, input);
    timer.stop(Phase::forward);
    in_flight.push_back({input, out.output, out.loss});
    return out.output;
  };
  // The activation's storage is not needed once sent: keep only its autograd node.
  auto release = [](const torch::Tensor& y) {
    if (y.defined()) y.set_data(torch::empty({1}, y.options()));
  };
  auto backward = [&](const torch::Tensor& grad_output) {
    InFlight f = std::move(in_flight.front());
    in_flight.pop_front();
    if (callbacks.before_backward) callbacks.before_backward(backwards);
    ++backwards;
    timer.start(Phase::backward);
    std::vector<torch::Tensor> roots, grads;
    if (f.output.defined()) {
      roots.push_back(f.output);
      grads.push_back(grad_output);
    }
    if (f.loss.defined() && f.loss.requires_grad()) {
      roots.push_back(f.loss);
      grads.push_back(torch::ones_like(f.loss));
    }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    timer.stop(Phase::backward);
    if (callbacks.after_backward) callbacks.after_backward();
    if (!f.input.defined()) return torch::Tensor();  // the first stage sends nothing back
    return f.input.grad().defined() ? f.input.grad() : torch::zeros(activation_shape, options);
  };

  const int64_t warmup = std::min<int64_t>(pp.size() - pp.rank() - 1, micro_batches);
  const int64_t steady = micro_batches - warmup;
  for (int64_t i = 0; i < warmup; ++i) {
    const auto y = forward(pipe.recv_forward(true));
    pipe.send_forward(y);
    release(y);
  }
  torch::Tensor input = steady > 0 ? pipe.recv_forward(true) : torch::Tensor();
  for (int64_t i = 0; i < steady; ++i) {
    const auto y = forward(input);
    const auto grad_output = pipe.send_forward_recv_backward(y);
    release(y);
    const auto grad_input = backward(grad_output);
    if (i == steady - 1) {
      pipe.send_backward(grad_input);
    } else {
      input = pipe.send_backward_recv_forward(grad_input);
    }
  }
  for (int64_t i = 0; i < warmup; ++i) pipe.send_backward(backward(pipe.recv_backward()));
  pipe.finish_sends();
}

void run_forward_only(Communicator& pp, int64_t micro_batches, const std::vector<int64_t>& activation_shape,
                      const torch::TensorOptions& options,
                      const std::function<StageOutput(int64_t i, const torch::Tensor& input)>& forward) {
  Pipe pipe(pp, activation_shape, options, nullptr);
  for (int64_t i = 0; i < micro_batches; ++i) pipe.send_forward(forward(i, pipe.recv_forward(false)).output);
  pipe.finish_sends();
}

void gather_to_first_stage(NamedTensors& tensors, Communicator& pp) {
  if (pp.size() == 1) return;
  // Host memory end to end (Note [Transport]): the receiver allocates on the CPU, whatever device
  // the sender's tensors live on, and a checkpoint is written from host memory anyway.
  constexpr Transport kHost = Transport::host;
  // host: all of this function (a checkpoint gather between steps).
  auto send_i64 = [&](std::vector<int64_t> v, int to) {
    pp.send(torch::tensor(v, torch::kInt64), to, kTag, kHost);  // host: header
  };
  auto recv_i64 = [&](int64_t n, int from) {
    auto t = torch::empty({n}, torch::kInt64);  // host: header
    pp.recv(t, from, kTag, kHost);
    return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
  };
  for (int stage = 1; stage < pp.size(); ++stage) {
    if (pp.rank() == stage) {
      // Header: the names (newline-separated bytes), then per tensor dtype, rank and sizes.
      std::string names;
      std::vector<int64_t> meta;
      for (const auto& [name, t] : tensors) {
        names += name + "\n";
        meta.push_back(static_cast<int64_t>(t.scalar_type()));
        meta.push_back(t.dim());
        for (int64_t d : t.sizes()) meta.push_back(d);
      }
      send_i64({static_cast<int64_t>(names.size()), static_cast<int64_t>(meta.size())}, 0);
      auto bytes = torch::empty({static_cast<int64_t>(names.size())}, torch::kUInt8);  // host: header
      std::memcpy(bytes.data_ptr(), names.data(), names.size());
      pp.send(bytes, 0, kTag, kHost);
      send_i64(meta, 0);
      // host: the checkpoint's tensors, read between steps.
      for (const auto& [name, t] : tensors) pp.send(t.to(torch::kCPU).contiguous(), 0, kTag, kHost);
    } else if (pp.rank() == 0) {
      const auto sizes = recv_i64(2, stage);
      auto bytes = torch::empty({sizes[0]}, torch::kUInt8);  // host: header
      pp.recv(bytes, stage, kTag, kHost);
      const auto meta = recv_i64(sizes[1], stage);
      std::istringstream names(std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(sizes[0])));
      std::string name;
      size_t at = 0;
      while (std::getline(names, name)) {
        const auto dtype = static_cast<torch::ScalarType>(meta[at]);
        const auto rank = meta[at + 1];
        std::vector<int64_t> shape(meta.begin() + static_cast<std::ptrdiff_t>(at + 2),
                                   meta.begin() + static_cast<std::ptrdiff_t>(at + 2 + static_cast<size_t>(rank)));
        at += 2 + static_cast<size_t>(rank);
        auto t = torch::empty(shape, torch::TensorOptions().dtype(dtype));  // host: written from here
        pp.recv(t, stage, kTag, kHost);
        tensors.emplace_back(name, t);
      }
    }
  }
}

}  // namespace moeforge
