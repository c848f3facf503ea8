// defines: Watched, watch_until, end_job_unless_claimed, StartupWatch, set_timeout_handler, set_job_abort
//
// One watchdog thread per process enforces parallel.distributed_timeout_minutes on every
// communication in flight, on any thread (the model of c10d's NCCL watchdog): blocking calls while
// they wait, the communication threads' asynchronous ones, posted sends from posting to completion,
// NCCL kernels. Past its timeout an operation is reported with the call, the group and its world
// ranks, and the whole job ends: a hung or dead peer never hangs the job, and no thread has to
// notice it itself. Waiting code only polls for completion. How the job ends is the command's
// choice (set_job_abort: MPI_Abort for `train`); this library only exits the process, which makes
// the launcher end the others.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moeforge {

// The setting that bounds an operation, named in its timeout message.
inline constexpr const char* kCommTimeoutSetting = "parallel.distributed_timeout_minutes";

// While alive: `operation` on `group` is in flight and must complete within `timeout_s`. Past it
// the watchdog runs `on_timeout` (e.g. aborting an NCCL communicator, so its kernels end), reports
// and ends the job. The thread starts with the first Watched of the process.
class Watched {
 public:
  Watched(const char* operation, const std::string& group, const std::vector<int>& world_ranks, double timeout_s,
          std::function<void()> on_timeout = {}, const char* setting = kCommTimeoutSetting);
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

// An error recorded for a later call to throw (AsyncError, parallel/comm/async_error.h): unless
// `claimed()` turns true within `grace_s`, the watchdog reports `message` and ends the job.
void end_job_unless_claimed(std::string message, double grace_s, std::function<bool()> claimed);

// A job's start-up, from before MPI_Init until its process groups exist; from then on every
// communication is Watched. A rank that never joins (stopped, crashed before MPI_Init, never
// started by the launcher) held the others in MPI_Init forever. The limit cannot come from the
// config, which is read after MPI_Init: it is the environment's MOEFORGE_STARTUP_TIMEOUT_S
// (seconds, default kDefaultStartupTimeoutS; the launch scripts set it). Past it the job ends with
// the phase start-up was in.
inline constexpr const char* kStartupTimeoutEnv = "MOEFORGE_STARTUP_TIMEOUT_S";
inline constexpr double kDefaultStartupTimeoutS = 600;
class StartupWatch {
 public:
  StartupWatch();  // a bad MOEFORGE_STARTUP_TIMEOUT_S is a UserError
  ~StartupWatch();
  StartupWatch(const StartupWatch&) = delete;
  StartupWatch& operator=(const StartupWatch&) = delete;
  void phase(const char* what);  // what start-up does now (a string literal), for the message

 private:
  uint64_t id_;
};

// What the watchdog does with an expired operation's message instead of printing it and ending the
// job (unit tests of the watchdog itself); an empty handler restores the default.
void set_timeout_handler(std::function<void(const std::string& message)> handler);

// How this process ends the whole job after reporting (the command that initialised MPI sets
// MPI_Abort); without one, or if it returns, the process exits with `exit_code`.
void set_job_abort(std::function<void(int exit_code)> abort);

}  // namespace moeforge
