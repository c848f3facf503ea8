// defines: NcclCommunicator
//
// The GPU backend: NCCL for CUDA tensors, built when CMake finds CUDA (MOEFORGE_WITH_CUDA) and
// linked against the NCCL the torch wheel ships (one NCCL per process, the one torch loads).
//
// Made from an MPI group, collectively: rank 0 of the group creates the NCCL unique id, MPI
// broadcasts it, every rank joins on its current CUDA device, which select_device()
// (core/device/device_runtime.h) must have set from the local rank before (NCCL binds a communicator to the device current at init).
//
// The device stream contract is the interface's (Note [device stream contract] in
// parallel/comm/communicator.h): one communication stream per communicator; a blocking call polls
// its event on the host; an `*_async` handle's wait() makes the caller's stream wait, and
// is_completed() asks the event. The process's watchdog (parallel/comm/watchdog.h) enforces the
// timeout on both: a hung peer aborts the communicator and ends the job with the call, the group
// and its ranks named. An error NCCL reports (ncclCommGetAsyncError) is c10d's asynchronous error
// (parallel/comm/async_error.h): the communicator is aborted and the next wait() or call on it
// throws a CommError naming the collective; the watchdog ends the job if none comes.
// Collectives on CPU tensors (scalars the trainer reduces: losses, norms, counts) go through the
// MPI group. Point-to-point calls go where their Transport says (Note [Transport]): device over
// NCCL, host over the MPI group, each end's tensors checked against it. send/recv ignore the tag
// on the device: NCCL matches point-to-point calls by order per peer.
#pragma once

#include "parallel/comm/communicator.h"
#include "parallel/comm/process_groups.h"

#include <memory>

namespace c10 {
struct Event;
}

namespace moeforge {

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(std::shared_ptr<Communicator> mpi_group, double timeout_seconds);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }
  const std::string& name() const override { return mpi_->name(); }
  const std::vector<int>& world_ranks() const override { return mpi_->world_ranks(); }

  void all_reduce(torch::Tensor& tensor, ReduceOp op) override;
  std::shared_ptr<Work> all_reduce_async(torch::Tensor tensor, ReduceOp op) override;
  torch::Tensor all_gather(const torch::Tensor& tensor) override;
  torch::Tensor reduce_scatter(const torch::Tensor& tensor, ReduceOp op) override;
  std::shared_ptr<Work> all_gather_async(const torch::Tensor& tensor, torch::Tensor& out) override;
  std::shared_ptr<Work> reduce_scatter_async(const torch::Tensor& tensor, torch::Tensor& out, ReduceOp op) override;
  torch::Tensor all_to_all(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                           const std::vector<int64_t>& recv_rows) override;
  std::shared_ptr<Work> all_to_all_async(const torch::Tensor& tensor, torch::Tensor& out, const std::vector<int64_t>& send_rows,
                                         const std::vector<int64_t>& recv_rows) override;
  void broadcast(torch::Tensor& tensor, int root) override;
  void send(const torch::Tensor& tensor, int peer, int tag, Transport transport) override;
  void recv(torch::Tensor& tensor, int peer, int tag, Transport transport) override;
  std::shared_ptr<Work> send_async(const torch::Tensor& tensor, int peer, int tag, Transport transport) override;
  void send_recv(const torch::Tensor& send, int send_peer, torch::Tensor& recv, int recv_peer, int tag,
                 Transport transport) override;
  // One NCCL group, the messages in list order.
  std::shared_ptr<Work> exchange(std::vector<PeerMessage>& messages, Transport transport) override;
  void barrier() override { mpi_->barrier(); }
  void slow_barrier(const SlowWait& bound) override { mpi_->slow_barrier(bound); }

 private:
  struct State;  // NCCL and CUDA types stay out of this header
  // The calls enqueued on the communication stream; the event after them.
  std::shared_ptr<c10::Event> launch_all_reduce(torch::Tensor& tensor, ReduceOp op);
  std::shared_ptr<c10::Event> launch_all_to_all(const torch::Tensor& tensor, torch::Tensor& out,
                                                const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows);
  std::shared_ptr<c10::Event> launch_send(const torch::Tensor& tensor, int peer);
  std::shared_ptr<c10::Event> launch_all_gather(const torch::Tensor& tensor, torch::Tensor& out);
  std::shared_ptr<c10::Event> launch_reduce_scatter(const torch::Tensor& tensor, torch::Tensor& out, ReduceOp op);
  // Blocking: polls `done` on the host.
  void wait(const char* operation, const c10::Event& done);
  // Asynchronous: the handle, and the watchdog polling `done`.
  std::shared_ptr<Work> async_work(const char* operation, std::shared_ptr<c10::Event> done);
  std::shared_ptr<Communicator> mpi_;
  double timeout_seconds_;
  std::shared_ptr<State> state_;  // shared with the watchdog's polls
};

}  // namespace moeforge
