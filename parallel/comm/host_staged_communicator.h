// defines: HostStagedCommunicator, StreamOrderTestHooks, stream_order_test_hooks
//
// Device collectives for an accelerator without NCCL (the emulated device, a vendor's backend), or
// for CUDA when asked (parallel.device_collectives: host): each call moves its device tensors to
// pinned host memory, runs the MPI call there and moves the result back, under the device stream
// contract (Note [device stream contract] in parallel/comm/communicator.h):
//   caller's thread: the communication stream waits for the caller's stream (an event), then the
//     device-to-host copies are enqueued on it and every device tensor of the call is recorded as
//     used there; the call returns;
//   this group's communication thread (parallel/comm/work.h), in submission order: waits on the host
//     for those copies, runs the MPI call on its own MPI communicator (a split of the group, used by
//     that thread only, so the compute thread's host collectives never interleave with it), enqueues
//     the host-to-device copies of the results on the communication stream and records `done`;
//   wait(): the host waits for the thread (MPI is host work), then the caller's stream waits for
//     `done`; a blocking call also waits on the host for `done`.
// A call that fails on the thread (an MPI error returned, a copy that threw) is recorded on the
// communicator (parallel/comm/async_error.h): its handle's wait(), and every call after, throws it
// naming the call; a handle nobody waits for does not drop it. Tests make the call named by
// MOEFORGE_TEST_FAIL_COMM fail there (read at each call, on the caller's thread).
// Tensors on the CPU go to the MPI group directly, as NcclCommunicator's do. Every device call of a
// group runs on one thread in submission order, so ranks that make the same calls in the same order
// match, as with NCCL; point-to-point messages match by tag over MPI.
#pragma once

#include "parallel/comm/communicator.h"
#include "parallel/comm/mpi_communicator.h"

#include <c10/core/Device.h>

#include <memory>
#include <string>

namespace moeforge {

// Test hooks for the stream-order checker's mutation tests (tests/unit/test_emulated_distributed.cpp):
// read once from MOEFORGE_TEST_DROP_STREAM_WAIT and MOEFORGE_TEST_DROP_RECORD_STREAM, each the name
// of one call ("all_to_all", "reduce_scatter", "all_reduce", "exchange", ...). For that call a
// handle's wait() leaves out the caller's stream wait (the host still waits for MPI), or the call
// leaves out recordStream: the bugs the checker must report. Never set in a real run.
struct StreamOrderTestHooks {
  std::string drop_stream_wait;
  std::string drop_record_stream;
};
const StreamOrderTestHooks& stream_order_test_hooks();

class HostStagedCommunicator : public Communicator {
 public:
  // Collective over `mpi_group` (it splits a communicator of its own); `device`: this rank's device,
  // current on the calling thread.
  HostStagedCommunicator(const std::shared_ptr<MpiCommunicator>& mpi_group, c10::Device device);
  ~HostStagedCommunicator() override;
  HostStagedCommunicator(const HostStagedCommunicator&) = delete;
  HostStagedCommunicator& operator=(const HostStagedCommunicator&) = delete;

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
  // Every message in flight at once over MPI; returns when the receives are on the caller's stream
  // (at once if there are none: a send-only exchange stays in flight, as over MPI and NCCL).
  std::shared_ptr<Work> exchange(std::vector<PeerMessage>& messages, Transport transport) override;
  void barrier() override { mpi_->barrier(); }
  void slow_barrier(const SlowWait& bound) override { mpi_->slow_barrier(bound); }

 private:
  struct State;    // the device's streams and the communication thread
  struct Staged;   // one call in flight
  // What the communication thread runs on the host copies of a call's inputs: the MPI call, writing
  // the host results (one per device output, of its shape).
  using HostCall = std::function<void(MpiCommunicator& mpi, const std::vector<torch::Tensor>& inputs_host,
                                      std::vector<torch::Tensor>& outputs_host)>;
  // Runs `call` under the stream contract: `inputs` are read, `outputs` (allocated by the caller)
  // written with the results.
  std::shared_ptr<Work> launch(const char* operation, const std::vector<torch::Tensor>& inputs,
                               const std::vector<torch::Tensor>& outputs, HostCall call);
  // The blocking contract: the handle waited for, then `done` on the host.
  void finish(const std::shared_ptr<Work>& work);

  std::shared_ptr<MpiCommunicator> mpi_;  // host tensors, from the compute thread
  std::unique_ptr<State> state_;
};

}  // namespace moeforge
