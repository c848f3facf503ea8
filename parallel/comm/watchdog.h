// defines: Watched, watch_until, set_timeout_handler
//
// One watchdog thread per process enforces parallel.distributed_timeout_minutes on every
// communication in flight, on any thread (the model of c10d's NCCL watchdog): blocking calls while
// they wait, the communication threads' asynchronous ones, posted sends from posting to completion,
// NCCL kernels. Past its timeout an operation is reported with the call, the group and its world
// ranks, and the whole job ends (MPI_Abort): a hung or dead peer never hangs the job, and no
// thread has to notice it itself. Waiting code only polls for completion.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moeforge {

// While alive: `operation` on `group` is in flight and must complete within `timeout_s`. Past it
// the watchdog runs `on_timeout` (e.g. aborting an NCCL communicator, so its kernels end), reports
// and ends the job. The thread starts with the first Watched of the process.
class Watched {
 public:
  Watched(const char* operation, const std::string& group, const std::vector<int>& world_ranks, double timeout_s,
          std::function<void()> on_timeout = {});
  ~Watched();
  Watched(const Watched&) = delete;
  Watched& operator=(const Watched&) = delete;

 private:
  uint64_t id_;
};

// For work whose end no thread waits for (NCCL collectives on a communication stream): `operation`
// is in flight until `completed()`, which the watchdog polls, returns true; past `timeout_s` as
// Watched.
void watch_until(const char* operation, const std::string& group, const std::vector<int>& world_ranks, double timeout_s,
                 std::function<bool()> completed, std::function<void()> on_timeout = {});

// What the watchdog does with an expired operation's message instead of printing it and ending the
// job (unit tests of the watchdog itself); an empty handler restores the default.
void set_timeout_handler(std::function<void(const std::string& message)> handler);

}  // namespace moeforge
