#include "parallel/comm/nccl_communicator.h"

#include "core/base/errors.h"
#include "core/device/host_sync.h"
#include "parallel/comm/async_error.h"
#include "parallel/comm/flight_recorder.h"
#include "parallel/comm/watchdog.h"

#include <c10/core/Event.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>

namespace moeforge {

namespace {

void check(ncclResult_t r, const char* call, const std::string& group) {
  if (r != ncclSuccess) {
    throw std::runtime_error(fmt::format("{} on group {} failed: {}", call, group, ncclGetErrorString(r)));
  }
}

ncclDataType_t nccl_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return ncclFloat32;
    case torch::kFloat64: return ncclFloat64;
    case torch::kBFloat16: return ncclBfloat16;
    case torch::kFloat16: return ncclFloat16;
    case torch::kInt64: return ncclInt64;
    case torch::kInt32: return ncclInt32;
    case torch::kUInt8: return ncclUint8;
    case torch::kInt8: return ncclInt8;
    default: throw std::invalid_argument(fmt::format("NcclCommunicator: unsupported dtype {}", c10::toString(t.scalar_type())));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::avg: return ncclAvg;
    case ReduceOp::max: return ncclMax;
  }
  return ncclSum;
}

void require_cuda_contiguous(const torch::Tensor& t, const char* op) {
  if (!t.is_cuda() || !t.is_contiguous()) {
    throw std::invalid_argument(fmt::format("NcclCommunicator::{}: tensors must be contiguous CUDA tensors", op));
  }
}

// The handle of an asynchronous call: wait() makes the caller's current stream wait for the
// collective (what runs there next sees its result); the host does not wait (c10d's contract).
// Host reads of a result go through to_host, which synchronises anyway.
class NcclWork : public Work {
 public:
  NcclWork(std::shared_ptr<c10::Event> done, c10::DeviceIndex device, std::shared_ptr<AsyncError> error)
      : done_(std::move(done)), device_(device), error_(std::move(error)) {}
  void wait() override {
    error_->rethrow();  // what the watchdog saw fail on this communicator (c10d's model)
    done_->block(c10::cuda::getCurrentCUDAStream(device_));
  }
  bool is_completed() override { return error_->failed() || done_->query(); }

 private:
  std::shared_ptr<c10::Event> done_;
  c10::DeviceIndex device_;
  std::shared_ptr<AsyncError> error_;
};

}  // namespace

struct NcclCommunicator::State {
  ncclComm_t comm = nullptr;
  c10::DeviceIndex device = 0;
  // Set once the communicator is aborted (an error seen, or a timeout): no NCCL call may use
  // `comm` after. ncclCommAbort may run on the watchdog's thread while this rank's thread is inside
  // NCCL (that is how a hung call ends), so this is a flag, not a lock.
  std::atomic<bool> aborted{false};
  std::shared_ptr<AsyncError> error;
  // Every NCCL call of this communicator runs on its one communication stream, in issue order
  // (as ProcessGroupNCCL): the compute stream goes on while it runs, and calls of one communicator
  // never race each other on two streams.
  std::optional<c10::cuda::CUDAStream> comm_stream;
  // Every call issued (parallel/comm/flight_recorder.h), channel "nccl" beside the MPI group's own.
  std::unique_ptr<FlightRecorder> recorder;

  // Enqueues the call on the communication stream after the compute stream's work so far (which
  // made its inputs); `tensors` are recorded as used there, so the caching allocator does not hand
  // their memory out again before the call is done. Returns the event after the call.
  template <typename Enqueue>
  std::shared_ptr<c10::Event> launch(std::initializer_list<torch::Tensor> tensors, Enqueue&& enqueue) {
    error->rethrow();  // an aborted communicator takes no more calls
    c10::Event inputs_ready(c10::DeviceType::CUDA);
    inputs_ready.record(c10::cuda::getCurrentCUDAStream(device));
    inputs_ready.block(*comm_stream);
    enqueue(comm_stream->stream());
    for (const auto& t : tensors) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), *comm_stream);
    auto done = std::make_shared<c10::Event>(c10::DeviceType::CUDA);
    done->record(*comm_stream);
    return done;
  }

  void abort() {
    if (!aborted.exchange(true)) ncclCommAbort(comm);
  }

  // Whether `operation` failed asynchronously (NCCL's error on the communicator); records it and
  // aborts the communicator, so the rest of its kernels end. Any thread; `device` must be current.
  bool failed(const char* operation) {
    if (aborted.load()) return true;
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(comm, &async) != ncclSuccess || async == ncclSuccess || async == ncclInProgress) return false;
    error->record("NCCL", operation, ncclGetErrorString(async));
    abort();
    return true;
  }
};

std::string nccl_version() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
  return fmt::format("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
}

NcclCommunicator::NcclCommunicator(std::shared_ptr<Communicator> mpi_group, double timeout_seconds)
    : mpi_(std::move(mpi_group)), timeout_seconds_(timeout_seconds), state_(std::make_shared<State>()) {
  state_->error = std::make_shared<AsyncError>(name(), world_ranks());
  state_->recorder = std::make_unique<FlightRecorder>(GroupIdentity{name(), "nccl", world_ranks(), mpi_->rank()});
  state_->device = c10::cuda::current_device();
  state_->comm_stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, state_->device);
  ncclUniqueId id{};
  if (mpi_->rank() == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId", name());
  auto id_bytes = torch::empty({static_cast<int64_t>(sizeof(id))}, torch::kUInt8);
  std::memcpy(id_bytes.data_ptr(), &id, sizeof(id));
  mpi_->broadcast(id_bytes, 0);
  std::memcpy(&id, id_bytes.data_ptr(), sizeof(id));
  check(ncclCommInitRank(&state_->comm, mpi_->size(), id, mpi_->rank()), "ncclCommInitRank", name());
}

NcclCommunicator::~NcclCommunicator() {
  if (state_ && state_->comm && !state_->aborted.load()) ncclCommDestroy(state_->comm);
}

void NcclCommunicator::wait(const char* operation, const c10::Event& done) {
  // The call's event polled on the host: the blocking contract.
  count_host_sync();
  const CommInFlight in_flight;  // the whole wait is exposed
  const ExposedWait exposed;
  // Past the timeout the watchdog (parallel/comm/watchdog.h) aborts the communicator, so its kernels
  // end, and then the job. An error NCCL reports meanwhile is thrown here, naming the call.
  const Watched watched(operation, name(), world_ranks(), timeout_seconds_, [state = state_] { state->abort(); });
  while (!done.query()) {
    if (state_->failed(operation)) {
      state_->error->rethrow();
      throw CommError(fmt::format("NCCL {} on group {}: the communicator was aborted", operation, name()));
    }
    std::this_thread::yield();
  }
}

std::shared_ptr<Work> NcclCommunicator::async_work(const char* operation, std::shared_ptr<c10::Event> done) {
  // The watchdog's thread has no current device: a query there would make a CUDA context on GPU 0
  // (hundreds of MB on another rank's GPU, on a node of several). Each poll sets this rank's. An
  // error NCCL reports meanwhile is recorded for the next wait() or call on this communicator.
  watch_until(operation, name(), world_ranks(), timeout_seconds_,
              [done, state = state_, operation] {
                const c10::cuda::CUDAGuard on_device(state->device);
                return done->query() || state->failed(operation);
              },
              [state = state_] { state->abort(); });
  return std::make_shared<NcclWork>(std::move(done), state_->device, state_->error);
}

void NcclCommunicator::all_reduce(torch::Tensor& tensor, ReduceOp op) {
  if (!tensor.is_cuda()) return mpi_->all_reduce(tensor, op);
  wait("all_reduce", *launch_all_reduce(tensor, op));
}

std::shared_ptr<Work> NcclCommunicator::all_reduce_async(torch::Tensor tensor, ReduceOp op) {
  if (!tensor.is_cuda()) return mpi_->all_reduce_async(std::move(tensor), op);
  return async_work("all_reduce", launch_all_reduce(tensor, op));
}

std::shared_ptr<c10::Event> NcclCommunicator::launch_all_reduce(torch::Tensor& tensor, ReduceOp op) {
  require_cuda_contiguous(tensor, "all_reduce");
  state_->recorder->record("all_reduce", c10::toString(tensor.scalar_type()), tensor.numel());
  return state_->launch({tensor}, [&](cudaStream_t stream) {
    check(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), static_cast<size_t>(tensor.numel()), nccl_type(tensor),
                        nccl_op(op), state_->comm, stream),
          "ncclAllReduce", name());
  });
}

torch::Tensor NcclCommunicator::all_gather(const torch::Tensor& tensor) {
  if (!tensor.is_cuda()) return mpi_->all_gather(tensor);
  torch::Tensor out;
  wait("all_gather", *launch_all_gather(tensor, out));
  return out;
}

std::shared_ptr<Work> NcclCommunicator::all_gather_async(const torch::Tensor& tensor, torch::Tensor& out) {
  if (!tensor.is_cuda()) return mpi_->all_gather_async(tensor, out);
  return async_work("all_gather", launch_all_gather(tensor, out));
}

std::shared_ptr<c10::Event> NcclCommunicator::launch_all_gather(const torch::Tensor& tensor, torch::Tensor& out) {
  require_cuda_contiguous(tensor, "all_gather");
  state_->recorder->record("all_gather", c10::toString(tensor.scalar_type()), tensor.numel());
  auto sizes = tensor.sizes().vec();
  if (sizes.empty()) sizes = {1};
  sizes[0] *= size();
  out = torch::empty(sizes, tensor.options());
  return state_->launch({tensor, out}, [&](cudaStream_t stream) {
    check(ncclAllGather(tensor.data_ptr(), out.data_ptr(), static_cast<size_t>(tensor.numel()), nccl_type(tensor),
                        state_->comm, stream),
          "ncclAllGather", name());
  });
}

torch::Tensor NcclCommunicator::reduce_scatter(const torch::Tensor& tensor, ReduceOp op) {
  if (!tensor.is_cuda()) return mpi_->reduce_scatter(tensor, op);
  torch::Tensor out;
  wait("reduce_scatter", *launch_reduce_scatter(tensor, out, op));
  return out;
}

std::shared_ptr<Work> NcclCommunicator::reduce_scatter_async(const torch::Tensor& tensor, torch::Tensor& out, ReduceOp op) {
  if (!tensor.is_cuda()) return mpi_->reduce_scatter_async(tensor, out, op);
  return async_work("reduce_scatter", launch_reduce_scatter(tensor, out, op));
}

std::shared_ptr<c10::Event> NcclCommunicator::launch_reduce_scatter(const torch::Tensor& tensor, torch::Tensor& out, ReduceOp op) {
  require_cuda_contiguous(tensor, "reduce_scatter");
  state_->recorder->record("reduce_scatter", c10::toString(tensor.scalar_type()), tensor.numel());
  if (tensor.dim() == 0 || tensor.size(0) % size() != 0) {
    throw std::invalid_argument(fmt::format("NcclCommunicator::reduce_scatter: dim 0 must divide by the group size {}", size()));
  }
  auto sizes = tensor.sizes().vec();
  sizes[0] /= size();
  out = torch::empty(sizes, tensor.options());
  return state_->launch({tensor, out}, [&](cudaStream_t stream) {
    check(ncclReduceScatter(tensor.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()), nccl_type(tensor),
                            nccl_op(op), state_->comm, stream),
          "ncclReduceScatter", name());
  });
}

torch::Tensor NcclCommunicator::all_to_all(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                                           const std::vector<int64_t>& recv_rows) {
  if (!tensor.is_cuda()) return mpi_->all_to_all(tensor, send_rows, recv_rows);
  torch::Tensor out;
  wait("all_to_all", *launch_all_to_all(tensor, out, send_rows, recv_rows));
  return out;
}

std::shared_ptr<Work> NcclCommunicator::all_to_all_async(const torch::Tensor& tensor, torch::Tensor& out,
                                                         const std::vector<int64_t>& send_rows,
                                                         const std::vector<int64_t>& recv_rows) {
  if (!tensor.is_cuda()) return mpi_->all_to_all_async(tensor, out, send_rows, recv_rows);
  return async_work("all_to_all", launch_all_to_all(tensor, out, send_rows, recv_rows));
}

std::shared_ptr<c10::Event> NcclCommunicator::launch_all_to_all(const torch::Tensor& tensor, torch::Tensor& out,
                                                                const std::vector<int64_t>& send_rows,
                                                                const std::vector<int64_t>& recv_rows) {
  require_cuda_contiguous(tensor, "all_to_all");
  state_->recorder->record("all_to_all", c10::toString(tensor.scalar_type()), tensor.numel());
  if (send_rows.size() != static_cast<size_t>(size()) || recv_rows.size() != static_cast<size_t>(size())) {
    throw std::invalid_argument("NcclCommunicator::all_to_all: one send and one receive count per rank");
  }
  auto sizes = tensor.sizes().vec();
  int64_t row = 1;  // elements per row
  for (size_t d = 1; d < sizes.size(); ++d) row *= sizes[d];
  int64_t total = 0;
  for (int64_t r : recv_rows) total += r;
  sizes[0] = total;
  out = torch::empty(sizes, tensor.options());
  const auto type = nccl_type(tensor);
  const auto bytes_per_row = row * static_cast<int64_t>(tensor.element_size());
  return state_->launch({tensor, out}, [&](cudaStream_t stream) {
    // Uneven all-to-all as grouped point-to-point calls (NCCL has no alltoallv).
    check(ncclGroupStart(), "ncclGroupStart", name());
    int64_t send_at = 0, recv_at = 0;
    for (int p = 0; p < size(); ++p) {
      const auto s = static_cast<size_t>(p);
      if (send_rows[s] > 0) {
        check(ncclSend(static_cast<const char*>(tensor.data_ptr()) + send_at * bytes_per_row,
                       static_cast<size_t>(send_rows[s] * row), type, p, state_->comm, stream),
              "ncclSend", name());
      }
      if (recv_rows[s] > 0) {
        check(ncclRecv(static_cast<char*>(out.data_ptr()) + recv_at * bytes_per_row, static_cast<size_t>(recv_rows[s] * row),
                       type, p, state_->comm, stream),
              "ncclRecv", name());
      }
      send_at += send_rows[s];
      recv_at += recv_rows[s];
    }
    check(ncclGroupEnd(), "ncclGroupEnd", name());
  });
}

void NcclCommunicator::broadcast(torch::Tensor& tensor, int root) {
  if (!tensor.is_cuda()) return mpi_->broadcast(tensor, root);
  require_cuda_contiguous(tensor, "broadcast");
  state_->recorder->record("broadcast", c10::toString(tensor.scalar_type()), tensor.numel(), root);
  wait("broadcast", *state_->launch({tensor}, [&](cudaStream_t stream) {
    check(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), static_cast<size_t>(tensor.numel()), nccl_type(tensor), root,
                        state_->comm, stream),
          "ncclBroadcast", name());
  }));
}

void NcclCommunicator::send(const torch::Tensor& tensor, int peer, int tag, Transport transport) {
  check_transport(tensor, transport, "send", name());
  if (transport == Transport::host) return mpi_->send(tensor, peer, tag, transport);
  wait("send", *launch_send(tensor, peer));
}

std::shared_ptr<Work> NcclCommunicator::send_async(const torch::Tensor& tensor, int peer, int tag, Transport transport) {
  check_transport(tensor, transport, "send_async", name());
  if (transport == Transport::host) return mpi_->send_async(tensor, peer, tag, transport);
  // On the one communication stream, in issue order with this group's other calls: the order the
  // blocking sends had, which pairs with the peer's receives as before.
  return async_work("send", launch_send(tensor, peer));
}

std::shared_ptr<c10::Event> NcclCommunicator::launch_send(const torch::Tensor& tensor, int peer) {
  require_cuda_contiguous(tensor, "send");
  state_->recorder->record("send", c10::toString(tensor.scalar_type()), tensor.numel(), peer, /*p2p=*/true);
  return state_->launch({tensor}, [&](cudaStream_t stream) {
    check(ncclSend(tensor.data_ptr(), static_cast<size_t>(tensor.numel()), nccl_type(tensor), peer, state_->comm, stream),
          "ncclSend", name());
  });
}

void NcclCommunicator::recv(torch::Tensor& tensor, int peer, int tag, Transport transport) {
  check_transport(tensor, transport, "recv", name());
  if (transport == Transport::host) return mpi_->recv(tensor, peer, tag, transport);
  require_cuda_contiguous(tensor, "recv");
  state_->recorder->record("recv", c10::toString(tensor.scalar_type()), tensor.numel(), peer, /*p2p=*/true);
  wait("recv", *state_->launch({tensor}, [&](cudaStream_t stream) {
    check(ncclRecv(tensor.data_ptr(), static_cast<size_t>(tensor.numel()), nccl_type(tensor), peer, state_->comm, stream),
          "ncclRecv", name());
  }));
}

void NcclCommunicator::send_recv(const torch::Tensor& send, int send_peer, torch::Tensor& recv, int recv_peer, int tag,
                                 Transport transport) {
  check_transport(send, transport, "send_recv", name());
  check_transport(recv, transport, "send_recv", name());
  if (transport == Transport::host) return mpi_->send_recv(send, send_peer, recv, recv_peer, tag, transport);
  require_cuda_contiguous(send, "send_recv");
  require_cuda_contiguous(recv, "send_recv");
  state_->recorder->record("send_recv", c10::toString(send.scalar_type()), send.numel(), send_peer, /*p2p=*/true);
  wait("send_recv", *state_->launch({send, recv}, [&](cudaStream_t stream) {
    check(ncclGroupStart(), "ncclGroupStart", name());
    check(ncclSend(send.data_ptr(), static_cast<size_t>(send.numel()), nccl_type(send), send_peer, state_->comm, stream),
          "ncclSend", name());
    check(ncclRecv(recv.data_ptr(), static_cast<size_t>(recv.numel()), nccl_type(recv), recv_peer, state_->comm, stream),
          "ncclRecv", name());
    check(ncclGroupEnd(), "ncclGroupEnd", name());
  }));
}

std::shared_ptr<Work> NcclCommunicator::exchange(std::vector<PeerMessage>& messages, Transport transport) {
  if (transport == Transport::host) return mpi_->exchange(messages, transport);
  for (const auto& m : messages) {
    check_transport(m.tensor, transport, "exchange", name());
    require_cuda_contiguous(m.tensor, "exchange");
  }
  for (const auto& m : messages) {
    state_->recorder->record(m.send ? "send" : "recv", c10::toString(m.tensor.scalar_type()), m.tensor.numel(), m.peer, /*p2p=*/true);
  }
  state_->error->rethrow();
  // The host does not wait; the watchdog polls the group as for any asynchronous call.
  c10::Event inputs_ready(c10::DeviceType::CUDA);
  inputs_ready.record(c10::cuda::getCurrentCUDAStream(state_->device));
  inputs_ready.block(*state_->comm_stream);
  const cudaStream_t stream = state_->comm_stream->stream();
  check(ncclGroupStart(), "ncclGroupStart", name());
  for (const auto& m : messages) {
    const auto count = static_cast<size_t>(m.tensor.numel());
    if (m.send) {
      check(ncclSend(m.tensor.data_ptr(), count, nccl_type(m.tensor), m.peer, state_->comm, stream), "ncclSend", name());
    } else {
      check(ncclRecv(m.tensor.data_ptr(), count, nccl_type(m.tensor), m.peer, state_->comm, stream), "ncclRecv", name());
    }
  }
  check(ncclGroupEnd(), "ncclGroupEnd", name());
  for (const auto& m : messages) c10::cuda::CUDACachingAllocator::recordStream(m.tensor.storage().data_ptr(), *state_->comm_stream);
  auto done = std::make_shared<c10::Event>(c10::DeviceType::CUDA);
  done->record(*state_->comm_stream);
  auto work = async_work("exchange", std::move(done));
  // The compute stream waits only for an exchange that receives (what runs next reads it); a
  // send-only one stays in flight, as over MPI (parallel/pipeline.cpp keeps its handle).
  const bool receives = std::any_of(messages.begin(), messages.end(), [](const PeerMessage& m) { return !m.send; });
  if (receives) work->wait();
  return work;
}

}  // namespace moeforge
