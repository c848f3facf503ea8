#include "parallel/comm/host_staged_communicator.h"

#include "core/device/host_sync.h"
#include "parallel/comm/async_error.h"

#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <fmt/format.h>

#include <cstdlib>
#include <string_view>

namespace moeforge {

const StreamOrderTestHooks& stream_order_test_hooks() {
  static const StreamOrderTestHooks hooks = [] {
    const auto read = [](const char* name) {
      const char* value = std::getenv(name);
      return std::string(value == nullptr ? "" : value);
    };
    return StreamOrderTestHooks{read("MOEFORGE_TEST_DROP_STREAM_WAIT"), read("MOEFORGE_TEST_DROP_RECORD_STREAM")};
  }();
  return hooks;
}

namespace {

// The handle of a call: the host waits for the communication thread's part (MPI), then the caller's
// current stream waits for the copies back (`done`).
class StagedWork : public Work {
 public:
  StagedWork(std::shared_ptr<Work> host, std::shared_ptr<c10::Event> done, c10::Device device, bool drop_stream_wait,
             std::shared_ptr<AsyncError> error)
      : host_(std::move(host)), done_(std::move(done)), device_(device), drop_stream_wait_(drop_stream_wait),
        error_(std::move(error)) {}
  void wait() override {
    host_->wait();
    error_->rethrow();  // this call's failure, or an earlier one's: the group is broken either way
    if (!drop_stream_wait_) done_->block(c10::impl::getDeviceGuardImpl(device_.type())->getStream(device_));
  }
  bool is_completed() override { return host_->is_completed() && done_->query(); }
  // The blocking contract: the host waits for the device copies too.
  void synchronize() {
    wait();
    done_->synchronize();
  }

 private:
  std::shared_ptr<Work> host_;
  std::shared_ptr<c10::Event> done_;
  c10::Device device_;
  bool drop_stream_wait_;
  std::shared_ptr<AsyncError> error_;
};

// send_async's and exchange's handle: the staged call, then the MPI sends the thread posted.
class PostedSend : public Work {
 public:
  PostedSend(std::shared_ptr<Work> staged, std::shared_ptr<std::shared_ptr<Work>> posted)
      : staged_(std::move(staged)), posted_(std::move(posted)) {}
  void wait() override {
    staged_->wait();
    (*posted_)->wait();
  }
  // No posted send once the staged call is complete means it failed: wait() rethrows that.
  bool is_completed() override { return staged_->is_completed() && (!*posted_ || (*posted_)->is_completed()); }

 private:
  std::shared_ptr<Work> staged_;
  std::shared_ptr<std::shared_ptr<Work>> posted_;
};

torch::Tensor pinned_like(const torch::Tensor& t) {
  return torch::empty(t.sizes(), torch::TensorOptions().dtype(t.scalar_type()).pinned_memory(true));
}

torch::Tensor host_like(const torch::Tensor& t) { return torch::empty(t.sizes(), torch::TensorOptions().dtype(t.scalar_type())); }

}  // namespace

struct HostStagedCommunicator::State {
  c10::Device device;
  const c10::impl::DeviceGuardImplInterface* impl;
  // Every call of this communicator runs on this one stream, in issue order (as NCCL's do).
  c10::Stream comm_stream;
  // The MPI calls of device tensors, made by `thread` only.
  std::unique_ptr<MpiCommunicator> staged;
  std::shared_ptr<AsyncError> error;  // the first call that failed on `thread`
  CommThread thread;  // declared last: destroyed first, after what was submitted has run

  void check_device(const torch::Tensor& t, const char* operation, const std::string& group) const {
    if (t.device() != device || !t.is_contiguous()) {
      throw std::invalid_argument(fmt::format("HostStagedCommunicator::{} on group {}: tensors must be contiguous {} "
                                              "tensors, got a {} tensor on {}",
                                              operation, group, device.str(),
                                              t.is_contiguous() ? "contiguous" : "non-contiguous", t.device().str()));
    }
  }
};

HostStagedCommunicator::HostStagedCommunicator(const std::shared_ptr<MpiCommunicator>& mpi_group, c10::Device device)
    : mpi_(mpi_group),
      state_(new State{device, c10::impl::getDeviceGuardImpl(device.type()),
                       c10::impl::getDeviceGuardImpl(device.type())->getStreamFromGlobalPool(device, /*isHighPriority=*/true),
                       mpi_group->split(0, mpi_group->rank(), mpi_group->name()),
                       std::make_shared<AsyncError>(mpi_group->name(), mpi_group->world_ranks()),
                       {}}) {}

HostStagedCommunicator::~HostStagedCommunicator() = default;

std::shared_ptr<Work> HostStagedCommunicator::launch(const char* operation, const std::vector<torch::Tensor>& inputs,
                                                     const std::vector<torch::Tensor>& outputs, HostCall call) {
  State& s = *state_;
  s.error->rethrow();  // a failed call broke the group: nothing after it may run
  for (const auto& t : inputs) s.check_device(t, operation, name());
  for (const auto& t : outputs) s.check_device(t, operation, name());
  // After the caller's work so far: the kernels that made the inputs.
  c10::Event inputs_ready(s.device.type());
  inputs_ready.record(s.impl->getStream(s.device));
  inputs_ready.block(s.comm_stream);
  std::vector<torch::Tensor> inputs_host;
  auto copied_out = std::make_shared<c10::Event>(s.device.type());
  {
    const c10::StreamGuard on_comm(s.comm_stream);
    for (const auto& t : inputs) inputs_host.push_back(pinned_like(t).copy_(t, /*non_blocking=*/true));
    copied_out->record(s.comm_stream);
  }
  const auto& hooks = stream_order_test_hooks();
  if (hooks.drop_record_stream != operation) {
    for (const auto* list : {&inputs, &outputs}) {
      for (const auto& t : *list) s.impl->recordDataPtrOnStream(t.storage().data_ptr(), s.comm_stream);
    }
  }
  const char* fail = std::getenv("MOEFORGE_TEST_FAIL_COMM");
  const bool inject_failure = fail != nullptr && std::string_view(fail) == operation;
  auto done = std::make_shared<c10::Event>(s.device.type());
  auto host = s.thread.submit([&s, operation, inject_failure, copied_out, inputs_host = std::move(inputs_host), outputs,
                               call = std::move(call), done] {
    if (s.error->failed()) return;  // the group is broken: its wait() throws why
    try {
      copied_out->synchronize();
      if (inject_failure) throw std::runtime_error("failure injected by MOEFORGE_TEST_FAIL_COMM");
      std::vector<torch::Tensor> outputs_host(outputs.size());
      call(*s.staged, inputs_host, outputs_host);
      const c10::StreamGuard on_comm(s.comm_stream);
      for (size_t i = 0; i < outputs.size(); ++i) outputs[i].copy_(outputs_host[i], /*non_blocking=*/true);
      done->record(s.comm_stream);
    } catch (const std::exception& e) {
      s.error->record("host-staged", operation, e.what());  // `done` stays unrecorded: waits on it pass
    }
  });
  return std::make_shared<StagedWork>(std::move(host), std::move(done), s.device, hooks.drop_stream_wait == operation, s.error);
}

void HostStagedCommunicator::finish(const std::shared_ptr<Work>& work) {
  count_host_sync();
  static_cast<StagedWork&>(*work).synchronize();
}

void HostStagedCommunicator::all_reduce(torch::Tensor& tensor, ReduceOp op) {
  if (tensor.device().is_cpu()) return mpi_->all_reduce(tensor, op);
  finish(all_reduce_async(tensor, op));
}

std::shared_ptr<Work> HostStagedCommunicator::all_reduce_async(torch::Tensor tensor, ReduceOp op) {
  if (tensor.device().is_cpu()) return mpi_->all_reduce_async(std::move(tensor), op);
  return launch("all_reduce", {tensor}, {tensor}, [op](MpiCommunicator& mpi, const auto& in, auto& out) {
    out[0] = in[0];
    mpi.all_reduce(out[0], op);
  });
}

torch::Tensor HostStagedCommunicator::all_gather(const torch::Tensor& tensor) {
  if (tensor.device().is_cpu()) return mpi_->all_gather(tensor);
  torch::Tensor out;
  finish(all_gather_async(tensor, out));
  return out;
}

std::shared_ptr<Work> HostStagedCommunicator::all_gather_async(const torch::Tensor& tensor, torch::Tensor& out) {
  if (tensor.device().is_cpu()) return mpi_->all_gather_async(tensor, out);
  auto sizes = tensor.sizes().vec();
  if (sizes.empty()) sizes = {1};
  sizes[0] *= size();
  out = torch::empty(sizes, tensor.options());
  return launch("all_gather", {tensor}, {out}, [shape = sizes](MpiCommunicator& mpi, const auto& in, auto& result) {
    result[0] = mpi.all_gather(in[0]).reshape(shape);
  });
}

torch::Tensor HostStagedCommunicator::reduce_scatter(const torch::Tensor& tensor, ReduceOp op) {
  if (tensor.device().is_cpu()) return mpi_->reduce_scatter(tensor, op);
  torch::Tensor out;
  finish(reduce_scatter_async(tensor, out, op));
  return out;
}

std::shared_ptr<Work> HostStagedCommunicator::reduce_scatter_async(const torch::Tensor& tensor, torch::Tensor& out, ReduceOp op) {
  if (tensor.device().is_cpu()) return mpi_->reduce_scatter_async(tensor, out, op);
  if (tensor.dim() == 0 || tensor.size(0) % size() != 0) {
    throw std::invalid_argument(
        fmt::format("HostStagedCommunicator::reduce_scatter on group {}: dim 0 must divide by the group size {}", name(), size()));
  }
  auto sizes = tensor.sizes().vec();
  sizes[0] /= size();
  out = torch::empty(sizes, tensor.options());
  return launch("reduce_scatter", {tensor}, {out},
                [op](MpiCommunicator& mpi, const auto& in, auto& result) { result[0] = mpi.reduce_scatter(in[0], op); });
}

torch::Tensor HostStagedCommunicator::all_to_all(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                                                 const std::vector<int64_t>& recv_rows) {
  if (tensor.device().is_cpu()) return mpi_->all_to_all(tensor, send_rows, recv_rows);
  torch::Tensor out;
  finish(all_to_all_async(tensor, out, send_rows, recv_rows));
  return out;
}

std::shared_ptr<Work> HostStagedCommunicator::all_to_all_async(const torch::Tensor& tensor, torch::Tensor& out,
                                                               const std::vector<int64_t>& send_rows,
                                                               const std::vector<int64_t>& recv_rows) {
  if (tensor.device().is_cpu()) return mpi_->all_to_all_async(tensor, out, send_rows, recv_rows);
  if (send_rows.size() != static_cast<size_t>(size()) || recv_rows.size() != static_cast<size_t>(size())) {
    throw std::invalid_argument(
        fmt::format("HostStagedCommunicator::all_to_all on group {}: one send and one receive count per rank", name()));
  }
  auto sizes = tensor.sizes().vec();
  sizes[0] = 0;
  for (const int64_t r : recv_rows) sizes[0] += r;
  out = torch::empty(sizes, tensor.options());
  return launch("all_to_all", {tensor}, {out}, [send_rows, recv_rows](MpiCommunicator& mpi, const auto& in, auto& result) {
    result[0] = mpi.all_to_all(in[0], send_rows, recv_rows);
  });
}

void HostStagedCommunicator::broadcast(torch::Tensor& tensor, int root) {
  if (tensor.device().is_cpu()) return mpi_->broadcast(tensor, root);
  finish(launch("broadcast", {tensor}, {tensor}, [root](MpiCommunicator& mpi, const auto& in, auto& out) {
    out[0] = in[0];
    mpi.broadcast(out[0], root);
  }));
}

void HostStagedCommunicator::send(const torch::Tensor& tensor, int peer, int tag, Transport transport) {
  check_transport(tensor, transport, "send", name());
  if (transport == Transport::host) return mpi_->send(tensor, peer, tag, transport);
  finish(launch("send", {tensor}, {}, [peer, tag](MpiCommunicator& mpi, const auto& in, auto&) {
    mpi.send(in[0], peer, tag, Transport::host);
  }));
}

std::shared_ptr<Work> HostStagedCommunicator::send_async(const torch::Tensor& tensor, int peer, int tag, Transport transport) {
  check_transport(tensor, transport, "send_async", name());
  if (transport == Transport::host) return mpi_->send_async(tensor, peer, tag, transport);
  // The thread posts an MPI_Isend and goes on: waiting there for the peer's receive would deadlock two
  // ranks that both send first (their receives queue behind the sends). The handle waits for it.
  auto posted = std::make_shared<std::shared_ptr<Work>>();
  auto staged = launch("send", {tensor}, {}, [peer, tag, posted](MpiCommunicator& mpi, const auto& in, auto&) {
    *posted = mpi.send_async(in[0], peer, tag, Transport::host);
  });
  return std::make_shared<PostedSend>(std::move(staged), std::move(posted));
}

void HostStagedCommunicator::recv(torch::Tensor& tensor, int peer, int tag, Transport transport) {
  check_transport(tensor, transport, "recv", name());
  if (transport == Transport::host) return mpi_->recv(tensor, peer, tag, transport);
  finish(launch("recv", {}, {tensor}, [peer, tag, like = host_like(tensor)](MpiCommunicator& mpi, const auto&, auto& out) {
    out[0] = like;
    mpi.recv(out[0], peer, tag, Transport::host);
  }));
}

void HostStagedCommunicator::send_recv(const torch::Tensor& send, int send_peer, torch::Tensor& recv, int recv_peer, int tag,
                                       Transport transport) {
  check_transport(send, transport, "send_recv", name());
  check_transport(recv, transport, "send_recv", name());
  if (transport == Transport::host) return mpi_->send_recv(send, send_peer, recv, recv_peer, tag, transport);
  finish(launch("send_recv", {send}, {recv},
                [send_peer, recv_peer, tag, like = host_like(recv)](MpiCommunicator& mpi, const auto& in, auto& out) {
                  out[0] = like;
                  mpi.send_recv(in[0], send_peer, out[0], recv_peer, tag, Transport::host);
                }));
}

std::shared_ptr<Work> HostStagedCommunicator::exchange(std::vector<PeerMessage>& messages, Transport transport) {
  if (transport == Transport::host) return mpi_->exchange(messages, transport);
  std::vector<torch::Tensor> sends, receives;
  std::vector<PeerMessage> plan;  // the messages with host tensors of the received shapes, filled by the thread
  for (const auto& m : messages) {
    check_transport(m.tensor, transport, "exchange", name());
    (m.send ? sends : receives).push_back(m.tensor);
    plan.push_back({m.send ? torch::Tensor() : host_like(m.tensor), m.peer, m.tag, m.send});
  }
  // The thread posts the sends and goes on once the receives are in, as send_async does: waiting
  // there for a peer's receive would hold every later call of the group behind it.
  auto posted = std::make_shared<std::shared_ptr<Work>>();
  auto staged = launch("exchange", sends, receives, [plan, posted](MpiCommunicator& mpi, const auto& in, auto& out) mutable {
    size_t next_send = 0, next_receive = 0;
    for (auto& m : plan) {
      if (m.send) m.tensor = in[next_send++];
    }
    *posted = mpi.exchange(plan, Transport::host);
    for (auto& m : plan) {
      if (!m.send) out[next_receive++] = m.tensor;
    }
  });
  // The caller's stream waits for the receives, which what runs next reads; a send-only exchange
  // returns at once (the pipeline's warm-up and cool-down: the receiver may be busy for a while).
  if (!receives.empty()) staged->wait();
  return std::make_shared<PostedSend>(std::move(staged), std::move(posted));
}

}  // namespace moeforge
