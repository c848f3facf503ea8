// defines: CommError, AsyncError
//
// c10d's model of a communication error that no thread was waiting for: an NCCL kernel that failed
// on the communication stream, a host-staged call that failed on the communication thread. The
// thread that sees it records it on the communicator (AsyncError::record); the next wait() or
// blocking call on that communicator throws it as a CommError naming the collective that failed,
// and so does every call after (the communicator is broken: NCCL's is aborted). If no call claims
// it within the grace period, the watchdog ends the job with the same message: an error is never
// dropped with the handle of a call nobody waited for (a send-only pipeline exchange).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace moeforge {

// A collective or point-to-point call that failed: a peer died or diverged, or the transport broke.
// Not the user's doing and not a bug of moeforge: the job ends, naming the call.
class CommError : public std::runtime_error {
 public:
  explicit CommError(const std::string& message) : std::runtime_error(message) {}
};

// How long a recorded error waits for a call to claim it before the watchdog ends the job: the
// next call on a communicator comes within a step (every group makes several per iteration), and a
// step of the mission's size takes seconds.
inline constexpr double kAsyncErrorGraceS = 60;

class AsyncError {
 public:
  AsyncError(std::string group, std::vector<int> world_ranks, double grace_s = kAsyncErrorGraceS);
  AsyncError(const AsyncError&) = delete;
  AsyncError& operator=(const AsyncError&) = delete;

  // The first error wins; later ones are consequences of it. `backend` says whose call (NCCL, MPI),
  // `operation` which; `what` the backend's reason. Thread-safe; arms the watchdog's grace.
  void record(const char* backend, const char* operation, const std::string& what);
  // Throws the recorded error as a CommError (and marks it claimed); returns if there is none.
  void rethrow();
  bool failed() const { return failed_.load(std::memory_order_acquire); }

 private:
  std::string group_;
  std::vector<int> world_ranks_;
  double grace_s_;
  std::mutex mutex_;
  std::string message_;
  std::atomic<bool> failed_{false};
  std::shared_ptr<std::atomic<bool>> claimed_;  // read by the watchdog, which may outlive this
};

}  // namespace moeforge
