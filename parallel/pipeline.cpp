#include "parallel/pipeline.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace moeforge {

namespace {

// Activations and gradients have a tag each (MPI pairs messages by tag; NCCL by order, which the
// schedule keeps the same on both sides). gather_to_first_stage uses its own.
constexpr int kActivationTag = 7, kGradientTag = 8, kGatherTag = 9;

struct SlotHash {
  size_t operator()(const PipelineSlot& s) const { return std::hash<int64_t>()(s.chunk * 1000003 + s.micro_batch); }
};

// One rank's step: runs the schedule's actions in order.
class Executor {
 public:
  Executor(Communicator& pp, int64_t chunks, bool training, const std::vector<int64_t>& shape,
           const torch::TensorOptions& options, const StageCallbacks& callbacks, StepTimer* timer)
      : pp_(pp),
        chunks_(chunks),
        training_(training),
        shape_(shape),
        options_(options),
        transport_(transport_for(options.device())),
        callbacks_(callbacks),
        timer_(timer) {}

  void run(const std::vector<PipelineAction>& actions) {
    for (const auto& a : actions) {
      switch (a.kind) {
        case PipelineAction::Kind::forward: forward(a.slot); break;
        case PipelineAction::Kind::backward: backward(a.slot); break;
        case PipelineAction::Kind::exchange: exchange(a.messages); break;
      }
    }
    timed(Phase::pipeline_wait, [&] {
      for (auto& w : sends_) w->wait();
    });
    sends_.clear();
    if (!in_flight_.empty() || !received_.empty() || !grads_.empty() || !to_send_.empty() || !to_send_grad_.empty()) {
      throw std::logic_error("run_pipeline: the schedule left micro-batches unfinished");
    }
  }

 private:
  struct InFlight {
    torch::Tensor input, output, loss;
  };
  bool first_chunk(const PipelineSlot& s) const { return pp_.rank() == 0 && s.chunk == 0; }
  bool last_chunk(const PipelineSlot& s) const { return pp_.rank() == pp_.size() - 1 && s.chunk == chunks_ - 1; }
  template <typename Map>
  static typename Map::mapped_type take(Map& map, const PipelineSlot& s, const char* what) {
    const auto it = map.find(s);
    if (it == map.end()) {
      throw std::logic_error(fmt::format("run_pipeline: no {} for chunk {} micro-batch {}", what, s.chunk, s.micro_batch));
    }
    auto value = std::move(it->second);
    map.erase(it);
    return value;
  }

  void forward(const PipelineSlot& s) {
    const torch::Tensor input = first_chunk(s) ? torch::Tensor() : take(received_, s, "received activation");
    StageOutput out = timed(Phase::forward, [&] { return callbacks_.forward(s, input); });
    if (!last_chunk(s)) to_send_[s] = out.output;
    if (training_) in_flight_[s] = {input, out.output, out.loss};
  }

  void backward(const PipelineSlot& s) {
    InFlight f = take(in_flight_, s, "forward");
    if (callbacks_.before_backward) callbacks_.before_backward(s);
    timed(Phase::backward, [&] {
      std::vector<torch::Tensor> roots, grads;
      if (!last_chunk(s)) {
        roots.push_back(f.output);
        grads.push_back(take(grads_, s, "received gradient"));
      }
      if (f.loss.defined() && f.loss.requires_grad()) {
        roots.push_back(f.loss);
        grads.push_back(torch::ones_like(f.loss));
      }
      if (!roots.empty()) torch::autograd::backward(roots, grads);
    });
    if (callbacks_.after_backward) callbacks_.after_backward(s);
    if (first_chunk(s)) return;  // the model's first chunk sends nothing back
    to_send_grad_[s] = f.input.grad().defined() ? f.input.grad() : torch::zeros(shape_, options_);
  }

  void exchange(const std::vector<PipelineMessage>& messages) {
    const int next = (pp_.rank() + 1) % pp_.size(), prev = (pp_.rank() + pp_.size() - 1) % pp_.size();
    std::vector<PeerMessage> batch;
    std::vector<torch::Tensor> sent_activations;
    for (const auto& m : messages) {
      const bool activation = m.kind == PipelineMessage::Kind::activation;
      PeerMessage p;
      p.send = m.send;
      p.tag = activation ? kActivationTag : kGradientTag;
      p.peer = activation == m.send ? next : prev;
      if (m.send && activation) {
        sent_activations.push_back(take(to_send_, m.slot, "activation to send"));
        p.tensor = sent_activations.back().detach().contiguous();
      } else if (m.send) {
        p.tensor = take(to_send_grad_, m.slot, "gradient to send").contiguous();
      } else {
        p.tensor = torch::empty(shape_, options_);
      }
      batch.push_back(std::move(p));
    }
    // An exchange that receives waits for its sends too: the neighbour is in the matching exchange
    // and MPI moves a large message only while its sender is inside an MPI call (rendezvous), so
    // a send left in flight would hold the neighbour up for this rank's whole next computation.
    // Send-only exchanges (warm-up, cool-down) stay in flight: their receiver may still be busy.
    const bool receives = std::any_of(messages.begin(), messages.end(), [](const auto& m) { return !m.send; });
    timed(Phase::pipeline_wait, [&] {
      auto sends = pp_.exchange(batch, transport_);
      if (receives) return sends->wait();
      // Completed sends are dropped as new ones are posted, which bounds what is held.
      std::erase_if(sends_, [](const std::shared_ptr<Work>& w) { return w->is_completed(); });
      sends_.push_back(std::move(sends));
    });
    // A sent activation's storage is not needed any more (the message holds its own reference
    // until sent): keep only its autograd node.
    for (auto& y : sent_activations) {
      if (training_ && y.defined()) y.set_data(torch::empty({1}, y.options()));
    }
    for (size_t j = 0; j < messages.size(); ++j) {
      const auto& m = messages[j];
      if (m.send) continue;
      if (m.kind == PipelineMessage::Kind::activation) {
        received_[m.slot] = training_ ? batch[j].tensor.requires_grad_(true) : batch[j].tensor;
      } else {
        grads_[m.slot] = batch[j].tensor;
      }
    }
  }

  template <typename F>
  std::invoke_result_t<F> timed(Phase phase, F&& f) {
    if (!timer_) return f();
    const auto scope = timer_->scope(phase);
    return f();
  }

  Communicator& pp_;
  int64_t chunks_;
  bool training_;
  std::vector<int64_t> shape_;
  torch::TensorOptions options_;
  Transport transport_;
  const StageCallbacks& callbacks_;
  StepTimer* timer_;
  std::unordered_map<PipelineSlot, InFlight, SlotHash> in_flight_;
  // Received activations and gradients, and what waits to be sent, by the slot on this rank.
  std::unordered_map<PipelineSlot, torch::Tensor, SlotHash> received_, grads_, to_send_, to_send_grad_;
  std::vector<std::shared_ptr<Work>> sends_;
};

}  // namespace

void run_pipeline(Communicator& pp, int64_t chunks, int64_t micro_batches, bool forward_only,
                  const std::vector<int64_t>& activation_shape, const torch::TensorOptions& options,
                  const StageCallbacks& callbacks, StepTimer* timer) {
  const auto actions = pipeline_schedule(pp.size(), pp.rank(), chunks, micro_batches, forward_only);
  Executor(pp, chunks, !forward_only, activation_shape, options, callbacks, timer).run(actions);
}

void gather_to_first_stage(NamedTensors& tensors, Communicator& pp) {
  if (pp.size() == 1) return;
  // Host memory end to end (Note [Transport]): the receiver allocates on the CPU, whatever device
  // the sender's tensors live on, and a checkpoint is written from host memory anyway.
  constexpr Transport kHost = Transport::host;
  // host: all of this function (a checkpoint gather between steps).
  auto send_i64 = [&](std::vector<int64_t> v, int to) {
    pp.send(torch::tensor(v, torch::kInt64), to, kGatherTag, kHost);  // host: header
  };
  auto recv_i64 = [&](int64_t n, int from) {
    auto t = torch::empty({n}, torch::kInt64);  // host: header
    pp.recv(t, from, kGatherTag, kHost);
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
      pp.send(bytes, 0, kGatherTag, kHost);
      send_i64(meta, 0);
      // host: the checkpoint's tensors, read between steps.
      for (const auto& [name, t] : tensors) pp.send(t.to(torch::kCPU).contiguous(), 0, kGatherTag, kHost);
    } else if (pp.rank() == 0) {
      const auto sizes = recv_i64(2, stage);
      auto bytes = torch::empty({sizes[0]}, torch::kUInt8);  // host: header
      pp.recv(bytes, stage, kGatherTag, kHost);
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
        pp.recv(t, stage, kGatherTag, kHost);
        tensors.emplace_back(name, t);
      }
    }
  }
}

}  // namespace moeforge
