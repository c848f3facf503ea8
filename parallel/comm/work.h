// defines: Work, completed_work, CommThread, CommTimes, comm_times, on_comm_thread, compute_waiting,
//          CommInFlight, ExposedWait
//
// Asynchronous communication. An `*_async` call of a Communicator returns a Work handle at once;
// the collective runs meanwhile and `wait()` returns when it is complete (and rethrows its error).
// Until then the caller must not touch the call's tensors. Every rank must start the same
// asynchronous calls on a group in the same order, as for blocking calls.
//
// CommThread is the MPI backend's communication thread: one per group that runs async calls, one
// after another in submission order, on its own duplicate of the group's MPI communicator (so
// blocking calls on the group, from the compute thread, never interleave with them). Timeouts stay
// where they are for blocking calls: each MPI wait polls against the group's timeout and ends the
// whole job past it, whichever thread waits, so a dead or hung peer never hangs the job.
//
// What communication costs is measured process-wide (CommTimes): the wall time with at least one
// collective in flight on any thread, and the time the compute thread spent waiting for one (in a
// blocking call or in Work::wait) — metrics.jsonl's time_comm_s and time_comm_exposed_s.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace moeforge {

class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the operation completed; rethrows the exception it ended with.
  virtual void wait() = 0;
  virtual bool is_completed() = 0;
};

// A handle for an operation that already ran (blocking backends, groups of one).
std::shared_ptr<Work> completed_work();

class CommThread {
 public:
  CommThread() = default;
  // Waits for every submitted operation, then ends the thread.
  ~CommThread();
  CommThread(const CommThread&) = delete;
  CommThread& operator=(const CommThread&) = delete;

  // Runs `op` after every operation submitted before it; the thread starts on first use.
  std::shared_ptr<Work> submit(std::function<void()> op);

 private:
  struct Task;
  void run();

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::shared_ptr<Task>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

struct CommTimes {
  double in_flight_s = 0;        // wall time with at least one collective in flight
  double exposed_s = 0;          // compute-thread time spent waiting for collectives
  double comm_thread_cpu_s = 0;  // CPU time the communication threads used (what overlap costs a core)
};
// Totals since the process started.
CommTimes comm_times();

// Whether the calling thread is a CommThread.
bool on_comm_thread();
// Whether the compute thread is waiting for communication now (an ExposedWait is alive): then a
// communication thread has the core to itself and polls without pausing.
bool compute_waiting();

// While alive: a collective is in flight (nested and concurrent ones count once in wall time).
class CommInFlight {
 public:
  CommInFlight();
  ~CommInFlight();
  CommInFlight(const CommInFlight&) = delete;
  CommInFlight& operator=(const CommInFlight&) = delete;
};

// While alive on a thread other than a CommThread: that thread waits for communication.
class ExposedWait {
 public:
  ExposedWait();
  ~ExposedWait();
  ExposedWait(const ExposedWait&) = delete;
  ExposedWait& operator=(const ExposedWait&) = delete;

 private:
  bool counted_;
  double start_;
};

}  // namespace moeforge
