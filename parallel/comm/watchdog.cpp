#include "parallel/comm/watchdog.h"

#include "core/base/errors.h"
#include "parallel/comm/flight_recorder.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <mutex>
#include <thread>
#include <utility>

namespace moeforge {

namespace {

using Clock = std::chrono::steady_clock;

struct Entry {
  const char* operation;
  std::string group;
  std::vector<int> world_ranks;
  double timeout_s;
  Clock::time_point deadline;
  std::function<void()> on_timeout;
  std::function<bool()> completed;  // polled (watch_until); else removed by its Watched
  const char* setting = kCommTimeoutSetting;  // what bounds it
  bool startup = false;                        // the StartupWatch: no peer group yet
  std::string report{};                        // if set, the whole message (an unclaimed error)
  std::optional<InFlightOp> in_flight{};       // the flight recorder's last call on the group, on this thread
};

Clock::time_point deadline_of(double timeout_s) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
}

// How long ranks wait for each other's flight-recorder dumps after a timeout: the others' waits
// started about when this one did and have the same limit, so they expire within about one
// timeout (at least 5 s for a loaded machine, at most a minute for a job's minutes-long timeout).
double hang_grace_s(double timeout_s) { return std::clamp(timeout_s, 5.0, 60.0); }

// A precision of a tenth of a second is enough for timeouts of seconds (tests) to minutes (jobs).
constexpr auto kPeriod = std::chrono::milliseconds(100);
// A watchdog that woke this much later than its period did not run in between: the process was
// stopped (SIGSTOP, a debugger) or starved, so a deadline passed in that gap is its own doing.
constexpr auto kStalled = std::chrono::seconds(2);

// This process's rank: MPI's once initialised, before that the launcher's environment (a start-up
// that never finishes MPI_Init has no other).
std::string rank_name() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  std::string rank = "?";
  if (initialized) {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    rank = std::to_string(r);
  } else {
    for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"}) {
      if (const char* v = std::getenv(var)) {
        rank = v;
        break;
      }
    }
  }
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return fmt::format("rank {} (host {}, pid {})", rank, host, ::getpid());
}

class Watchdog {
 public:
  static Watchdog& get() {
    static Watchdog w;
    return w;
  }

  uint64_t add(Entry e) {
    std::lock_guard lock(mutex_);
    if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
    const uint64_t id = next_++;
    entries_.emplace(id, std::move(e));
    return id;
  }
  void set_operation(uint64_t id, const char* operation) {
    std::lock_guard lock(mutex_);
    if (auto it = entries_.find(id); it != entries_.end()) it->second.operation = operation;
  }
  void remove(uint64_t id) {
    std::lock_guard lock(mutex_);
    entries_.erase(id);
  }
  void set_handler(std::function<void(const std::string&)> h) {
    std::lock_guard lock(mutex_);
    handler_ = std::move(h);
  }
  void set_job_abort(std::function<void(int)> abort) {
    std::lock_guard lock(mutex_);
    job_abort_ = std::move(abort);
  }

  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    changed_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    std::unique_lock lock(mutex_);
    auto last_tick = Clock::now();
    while (!stopping_) {
      changed_.wait_for(lock, kPeriod);
      const auto now = Clock::now();
      const auto previous_tick = std::exchange(last_tick, now);
      const auto gap = now - previous_tick;
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (it->second.completed && it->second.completed()) {
          it = entries_.erase(it);
          continue;
        }
        if (now <= it->second.deadline) {
          ++it;
          continue;
        }
        Entry e = std::move(it->second);
        it = entries_.erase(it);
        // Its deadline passed while this process was not running.
        const bool own_stall = gap > kStalled && e.deadline > previous_tick;
        expire(e, own_stall ? gap : Clock::duration::zero(), lock);
      }
    }
  }

  // Called with the lock held; releases it while the handler runs. `stalled`: how long this
  // process itself did not run just before the deadline was seen passed (zero if it ran).
  void expire(Entry& e, Clock::duration stalled, std::unique_lock<std::mutex>& lock) {
    const auto message =
        fmt::format("error: {}: {}. Ending the job.", rank_name(), e.report.empty() ? cause(e, stalled) : e.report);
    auto handler = handler_;
    auto job_abort = job_abort_;
    lock.unlock();
    if (handler) {
      handler(message);
    } else {
      if (e.on_timeout) e.on_timeout();
      std::fprintf(stderr, "%s\n", message.c_str());
      std::fflush(stderr);
      // A communication timeout: every rank's flight recorder to <run_dir>/hang, rank 0's verdict.
      if (!e.startup && e.report.empty()) report_hang(message, hang_grace_s(e.timeout_s));
      // The command that started the job knows how to end all of it (MPI_Abort); this library does
      // not: exiting before MPI_Finalize makes the launcher end the others (mpirun, srun's
      // --kill-on-bad-exit), only less promptly.
      if (job_abort) job_abort(1);
      std::_Exit(1);
    }
    lock.lock();
  }

  static std::string cause(const Entry& e, Clock::duration stalled) {
    const std::string what =
        e.startup ? fmt::format("start-up did not finish within {:.1f} s ({}), still in {}", e.timeout_s, e.setting, e.operation)
                  : fmt::format("{} on group {} (world ranks [{}]) did not complete within {:.1f} s ({})", e.operation,
                                e.group, fmt::join(e.world_ranks, ", "), e.timeout_s, e.setting);
    if (stalled > Clock::duration::zero()) {
      return fmt::format("{}: this rank itself did not run for the last {:.1f} s (stopped by a signal or a debugger, "
                         "or starved of CPU), so it is the rank that held the job up",
                         what, std::chrono::duration<double>(stalled).count());
    }
    if (e.startup) {
      return what + ": a rank that has not joined (stopped or crashed before MPI_Init, or never started by the "
                    "launcher) holds the others here; raise " + e.setting + " if start-up is just slow";
    }
    return what + ": a peer rank is hung or has died" + (e.in_flight ? "; " + describe_wait(*e.in_flight) : std::string());
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<uint64_t, Entry> entries_;
  uint64_t next_ = 0;
  bool stopping_ = false;
  std::function<void(const std::string&)> handler_;
  std::function<void(int)> job_abort_;
  std::thread thread_;
};

}  // namespace

Watched::Watched(const char* operation, const std::string& group, const std::vector<int>& world_ranks, double timeout_s,
                 std::function<void()> on_timeout, const char* setting)
    : id_(Watchdog::get().add({operation, group, world_ranks, timeout_s, deadline_of(timeout_s), std::move(on_timeout), {},
                               setting, false, {}, current_op(group)})) {}

Watched::~Watched() { Watchdog::get().remove(id_); }

void watch_until(const char* operation, const std::string& group, const std::vector<int>& world_ranks, double timeout_s,
                 std::function<bool()> completed, std::function<void()> on_timeout) {
  Watchdog::get().add({operation, group, world_ranks, timeout_s, deadline_of(timeout_s), std::move(on_timeout), std::move(completed),
                       kCommTimeoutSetting, false, {}, current_op(group)});
}

namespace {

double startup_timeout_s() {
  const char* text = std::getenv(kStartupTimeoutEnv);
  if (text == nullptr || *text == '\0') return kDefaultStartupTimeoutS;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text, &end);
  // At most a day: longer is a typo, and deadlines are 64-bit nanoseconds.
  if (errno != 0 || end == text || *end != '\0' || !(v > 0) || v > 86400) {
    fail_user("{}={} is not a start-up timeout: give seconds, a number above 0 and at most 86400 (default {:g})",
              kStartupTimeoutEnv, text, kDefaultStartupTimeoutS);
  }
  return v;
}

}  // namespace

StartupWatch::StartupWatch() {
  Entry e{"MPI_Init", "world", {}, 0, {}, {}, {}, kStartupTimeoutEnv, true};
  e.timeout_s = startup_timeout_s();
  e.deadline = deadline_of(e.timeout_s);
  id_ = Watchdog::get().add(std::move(e));
}

StartupWatch::~StartupWatch() { Watchdog::get().remove(id_); }

void StartupWatch::phase(const char* what) { Watchdog::get().set_operation(id_, what); }

void end_job_unless_claimed(std::string message, double grace_s, std::function<bool()> claimed) {
  Entry e{"claiming an error", "", {}, grace_s, deadline_of(grace_s), {}, std::move(claimed)};
  e.report = std::move(message) + fmt::format(" (no call on the group claimed this error within {:g} s)", grace_s);
  Watchdog::get().add(std::move(e));
}

void set_timeout_handler(std::function<void(const std::string& message)> handler) { Watchdog::get().set_handler(std::move(handler)); }

void set_job_abort(std::function<void(int exit_code)> abort) { Watchdog::get().set_job_abort(std::move(abort)); }

}  // namespace moeforge
