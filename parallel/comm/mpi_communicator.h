// defines: MpiRuntime, MpiCommunicator
//
// MPI for CPU tensors. MpiRuntime initializes MPI once per process (MPI_THREAD_MULTIPLE: each
// group's communication thread calls MPI beside the compute thread) and finds this process's world rank, world size and node-local rank
// (MPI_Comm_split_type SHARED, so it works under Open MPI's mpirun, MPICH/Hydra and SLURM's srun
// alike). MpiCommunicator implements the Communicator contract with non-blocking MPI calls that are
// polled against the group's timeout, so a hung or dead peer ends the job with a message instead
// of hanging it. bf16/fp16 are reduced in fp32 and moved as bytes otherwise; messages larger than
// MPI's int counts are sent in chunks.
#pragma once

#include "parallel/comm/communicator.h"
#include "parallel/comm/work.h"

#include <mpi.h>

#include <memory>
#include <string>
#include <vector>

namespace moeforge {

class MpiRuntime {
 public:
  // Whether an MPI launcher (Open MPI's mpirun, MPICH/Hydra, PMIx, SLURM's srun) started this
  // process; the only place its environment is read. Every other rank and size comes from MPI.
  static bool launched();
  // Initializes MPI if this process has not; finalizes on destruction if it did.
  MpiRuntime();
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  int local_rank() const { return local_rank_; }  // among the ranks on this node
  int local_size() const { return local_size_; }

 private:
  bool initialized_here_ = false;
  int world_rank_ = 0, world_size_ = 1, local_rank_ = 0, local_size_ = 1;
};

class MpiCommunicator : public Communicator {
 public:
  // The whole world (MPI_COMM_WORLD, not freed).
  static std::unique_ptr<MpiCommunicator> world(double timeout_seconds);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  // A sub-group: the ranks passing the same `color` form one group, ordered by `key`. Collective
  // over this group.
  std::unique_ptr<MpiCommunicator> split(int color, int key, const std::string& name) const;
  // The sub-group of exactly `world_ranks_of_group` (this rank must be one of them); every rank of
  // this group calls it, each with the members of its own group. Groups must partition the ranks.
  std::unique_ptr<MpiCommunicator> group_of(const std::vector<int64_t>& world_ranks_of_group, const std::string& name) const;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const std::vector<int>& world_ranks() const override { return world_ranks_; }
  double timeout_seconds() const { return timeout_seconds_; }
  // Largest message part in elements (default INT_MAX); smaller values exercise chunking in tests.
  // Not while asynchronous calls are in flight (their thread reads it when it runs them).
  void set_max_chunk_elements(int64_t n) {
    max_chunk_ = n;
    if (async_peer_) async_peer_->max_chunk_ = n;
  }

  void all_reduce(torch::Tensor& tensor, ReduceOp op) override;
  // On this group's communication thread (parallel/comm/work.h) where MPI provides MPI_THREAD_MULTIPLE;
  // blocking otherwise.
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
  // Host transport only (device memory travels over NCCL).
  void send(const torch::Tensor& tensor, int peer, int tag, Transport transport) override;
  void recv(torch::Tensor& tensor, int peer, int tag, Transport transport) override;
  // Posted on this thread (MPI_Isend; no communication thread: MPI progresses it inside any later
  // MPI call of the process). Its wait() polls against the group's timeout, counted from the wait.
  std::shared_ptr<Work> send_async(const torch::Tensor& tensor, int peer, int tag, Transport transport) override;
  void send_recv(const torch::Tensor& send, int send_peer, torch::Tensor& recv, int recv_peer, int tag,
                 Transport transport) override;
  void barrier() override;
  void slow_barrier(const SlowWait& bound) override;

 private:
  class RequestWork;  // the handle of send_async: MPI requests polled by wait()

  // `async`: with a communication thread and its duplicate communicator (not for that duplicate).
  MpiCommunicator(MPI_Comm comm, std::string name, double timeout_seconds, bool owned, bool async);
  // Polls `request` until it completes; past the timeout, reports and aborts the whole job.
  void wait(MPI_Request& request, const char* operation) const;
  void wait_all(std::vector<MPI_Request>& requests, const char* operation) const;
  void check_reduce_scatter(const torch::Tensor& tensor) const;
  // The tensor's parts posted with MPI_Isend (after the checks of `operation`).
  std::vector<MPI_Request> post_send(const torch::Tensor& tensor, int peer, int tag, Transport transport, const char* operation);
  // The all-to-all's arguments checked, and its output allocated (in the caller's thread, so a
  // misuse of an asynchronous call fails there); then the exchange into it.
  torch::Tensor all_to_all_output(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                                  const std::vector<int64_t>& recv_rows) const;
  void all_to_all_into(const torch::Tensor& tensor, torch::Tensor& out, const std::vector<int64_t>& send_rows,
                       const std::vector<int64_t>& recv_rows);
  // Calls post(pointer, bytes) for each consecutive part of the tensor's bytes, parts of at most
  // max_chunk_ elements and of MPI's int count (none for an empty tensor); for the byte-moving calls.
  template <typename Post>
  void for_each_part(const torch::Tensor& tensor, Post&& post) const;

  MPI_Comm comm_;
  std::string name_;
  double timeout_seconds_;
  bool owned_;
  int rank_ = 0, size_ = 1;
  std::vector<int> world_ranks_;
  int64_t max_chunk_;
  // Asynchronous calls: the same group on a duplicate communicator, and the thread that runs them
  // (declared last: destroyed first, after it has run what was submitted).
  std::unique_ptr<MpiCommunicator> async_peer_;
  std::unique_ptr<CommThread> comm_thread_;
};

}  // namespace moeforge
