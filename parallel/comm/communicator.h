// defines: ReduceOp, Transport, transport_for, check_transport, Communicator, LocalCommunicator
//
// The one communication interface the runtime uses: a group of ranks and the collectives MoE
// training needs. Backends: MpiCommunicator (CPU tensors, parallel/comm/mpi_communicator.h),
// NcclCommunicator (CUDA tensors over NCCL), HostStagedCommunicator (any accelerator's tensors
// through pinned host memory and MPI) and LocalCommunicator (a group of one: every call is a copy,
// so single-process code paths need no MPI).
//
// Contract of every call but the `*_async` ones: blocking. It returns when this rank's part is
// complete: its output holds the result and its input may be reused. Every rank of the group must
// make the same calls in the same order with matching shapes and dtypes. A call that does not
// complete within the group's timeout ends the process with a message naming the call, the group
// and its ranks (a hung or dead peer must not hang the job). Tensors must be contiguous; bf16 and
// fp16 are moved as bytes and reduced in fp32 on the host (NCCL reduces them natively).
//
// Note [device stream contract]: for tensors on an accelerator, every call of a communicator runs
// on that communicator's one communication stream, after the work the caller's current stream had
// enqueued when it was called (so after the kernels that produced its input), and its tensors are
// recorded as used on that stream (recordStream), so the caching allocator does not hand their
// memory out again before the call is done. A blocking call then waits on the host. An `*_async`
// call returns at once; its handle's wait() makes the caller's current stream wait for the call
// (the host does not wait for device work; a host-staged call's host part, MPI, is waited for) and
// what runs on that stream next sees the result. Host reads of a result synchronise anyway.
//
// Note [Transport]: a point-to-point message travels in host memory (MPI) or in device memory
// (NCCL), and the two ends must agree, or each waits for a message the other never sends. So the
// transport is an argument of send, recv and send_recv, decided by the code both ranks run (the
// pipeline: the device the run trains on; checkpoint gathers: always host), and each end checks
// its own tensors against it; it is never inferred from a rank's own tensor, which differs
// between ranks exactly when a caller allocates its receive buffer elsewhere. Collectives are
// symmetric (every rank passes a tensor made by the same code), so their tensors pick it.
#pragma once

#include "parallel/comm/work.h"

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

enum class ReduceOp { sum, avg, max };

enum class Transport { host, device };
// The transport of tensors on `device`: host for the CPU, device otherwise.
Transport transport_for(const torch::Device& device);
// Throws std::invalid_argument naming the call and the group unless `tensor` lives where
// `transport` moves it.
void check_transport(const torch::Tensor& tensor, Transport transport, const char* operation, const std::string& group);

// One message of Communicator::exchange.
struct PeerMessage {
  torch::Tensor tensor;  // what is sent, or where it is received (of the sent shape)
  int peer = 0;
  int tag = 0;
  bool send = true;
};

// What bounds a slow_barrier: `what` is waited for at most `timeout_s`, the value of `setting`.
struct SlowWait {
  const char* what;  // a string literal, named in the timeout's message
  double timeout_s;
  const char* setting;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;  // in the group
  virtual int size() const = 0;
  // "world", "dp", "ep", ...: what error messages call the group.
  virtual const std::string& name() const = 0;
  // The world ranks of the members, in group order.
  virtual const std::vector<int>& world_ranks() const = 0;

  // In place: every rank ends with op over all ranks' tensors.
  virtual void all_reduce(torch::Tensor& tensor, ReduceOp op) = 0;
  // all_reduce started now and complete when the handle's wait() returns (parallel/comm/work.h); the
  // caller leaves `tensor` alone until then. This default runs it blocking.
  virtual std::shared_ptr<Work> all_reduce_async(torch::Tensor tensor, ReduceOp op) {
    all_reduce(tensor, op);
    return completed_work();
  }
  // Every rank's tensor (same shape) concatenated along dim 0, in rank order.
  virtual torch::Tensor all_gather(const torch::Tensor& tensor) = 0;
  // op over all ranks' tensors, of which rank r keeps the r-th of `size()` equal chunks along dim 0.
  virtual torch::Tensor reduce_scatter(const torch::Tensor& tensor, ReduceOp op) = 0;
  // all_gather / reduce_scatter started now into `out` (allocated by the call), complete when the
  // handle's wait() returns; until then the caller leaves `tensor` and `out` alone. These defaults
  // run them blocking.
  virtual std::shared_ptr<Work> all_gather_async(const torch::Tensor& tensor, torch::Tensor& out) {
    out = all_gather(tensor);
    return completed_work();
  }
  virtual std::shared_ptr<Work> reduce_scatter_async(const torch::Tensor& tensor, torch::Tensor& out, ReduceOp op) {
    out = reduce_scatter(tensor, op);
    return completed_work();
  }
  // Uneven all-to-all along dim 0: rows [sum(send_rows[:p]), +send_rows[p]) go to rank p; the
  // result holds recv_rows[p] rows from each rank p, in rank order.
  virtual torch::Tensor all_to_all(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                                   const std::vector<int64_t>& recv_rows) = 0;
  // all_to_all started now into `out` (allocated by the call), complete when the handle's wait()
  // returns; until then the caller leaves `tensor` and `out` alone. This default runs it blocking.
  virtual std::shared_ptr<Work> all_to_all_async(const torch::Tensor& tensor, torch::Tensor& out,
                                                 const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows) {
    out = all_to_all(tensor, send_rows, recv_rows);
    return completed_work();
  }
  // In place: every rank ends with `root`'s tensor.
  virtual void broadcast(torch::Tensor& tensor, int root) = 0;
  // Point-to-point, over `transport` (Note [Transport]).
  virtual void send(const torch::Tensor& tensor, int peer, int tag, Transport transport) = 0;
  virtual void recv(torch::Tensor& tensor, int peer, int tag, Transport transport) = 0;  // into a tensor of the sent shape
  // send() posted now and complete at the handle's wait() (the handle keeps `tensor` alive): the
  // pipeline's sends, which need not complete before the sender goes on. Matches the peer's recv()
  // or send_recv() like a blocking send. This default runs it blocking.
  virtual std::shared_ptr<Work> send_async(const torch::Tensor& tensor, int peer, int tag, Transport transport) {
    send(tensor, peer, tag, transport);
    return completed_work();
  }
  // send() to `send_peer` and recv() from `recv_peer` in one call, both in flight together: the
  // pipeline's paired exchanges (send an activation, receive a gradient), which would deadlock as
  // two blocking calls when both neighbours send first.
  virtual void send_recv(const torch::Tensor& send, int send_peer, torch::Tensor& recv, int recv_peer, int tag,
                         Transport transport) = 0;
  // Every message of `messages` in flight at once (Megatron's batch_isend_irecv: the pipeline's
  // exchanges); returns when the receives have arrived, with a handle that completes with the
  // sends (and keeps their tensors until then). NCCL pairs the messages between two ranks by their
  // order, so both must list them in the same order; MPI pairs them by tag. This default posts
  // the sends with send_async, then receives one message after the other.
  virtual std::shared_ptr<Work> exchange(std::vector<PeerMessage>& messages, Transport transport);
  virtual void barrier() = 0;
  // A barrier at which ranks wait for work that others do alone and that may outlast
  // parallel.distributed_timeout_minutes (a save on the ranks that write): bounded by `bound`
  // instead. This default is the plain barrier (groups with no timeout of their own).
  virtual void slow_barrier(const SlowWait& bound) {
    (void)bound;
    barrier();
  }
};

// A group of one rank.
class LocalCommunicator : public Communicator {
 public:
  explicit LocalCommunicator(std::string name = "world", int world_rank = 0) : name_(std::move(name)), ranks_{world_rank} {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  const std::vector<int>& world_ranks() const override { return ranks_; }
  void all_reduce(torch::Tensor&, ReduceOp) override {}
  torch::Tensor all_gather(const torch::Tensor& tensor) override { return tensor.clone(); }
  torch::Tensor reduce_scatter(const torch::Tensor& tensor, ReduceOp) override { return tensor.clone(); }
  torch::Tensor all_to_all(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                           const std::vector<int64_t>& recv_rows) override;
  void broadcast(torch::Tensor&, int root) override;
  void send(const torch::Tensor&, int peer, int, Transport) override;
  void recv(torch::Tensor&, int peer, int, Transport) override;
  void send_recv(const torch::Tensor&, int send_peer, torch::Tensor&, int, int, Transport transport) override {
    send({}, send_peer, 0, transport);
  }
  void barrier() override {}

 private:
  std::string name_;
  std::vector<int> ranks_;
};

}  // namespace moeforge
