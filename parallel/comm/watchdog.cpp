#include "parallel/comm/watchdog.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>

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
};

Clock::time_point deadline_of(double timeout_s) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
}

// A precision of a tenth of a second is enough for timeouts of seconds (tests) to minutes (jobs).
constexpr auto kPeriod = std::chrono::milliseconds(100);

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
  void remove(uint64_t id) {
    std::lock_guard lock(mutex_);
    entries_.erase(id);
  }
  void set_handler(std::function<void(const std::string&)> h) {
    std::lock_guard lock(mutex_);
    handler_ = std::move(h);
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
    while (!stopping_) {
      changed_.wait_for(lock, kPeriod);
      const auto now = Clock::now();
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
        expire(e, lock);
      }
    }
  }

  // Called with the lock held; releases it while the handler runs.
  void expire(Entry& e, std::unique_lock<std::mutex>& lock) {
    int world_rank = 0, initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    const auto message = fmt::format(
        "error: rank {}: {} on group {} (world ranks [{}]) did not complete within {:.1f} s "
        "(parallel.distributed_timeout_minutes): a peer rank is hung or has died. Ending the job.",
        world_rank, e.operation, e.group, fmt::join(e.world_ranks, ", "), e.timeout_s);
    auto handler = handler_;
    lock.unlock();
    if (handler) {
      handler(message);
    } else {
      if (e.on_timeout) e.on_timeout();
      std::fprintf(stderr, "%s\n", message.c_str());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    lock.lock();
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<uint64_t, Entry> entries_;
  uint64_t next_ = 0;
  bool stopping_ = false;
  std::function<void(const std::string&)> handler_;
  std::thread thread_;
};

}  // namespace

Watched::Watched(const char* operation, const std::string& group, const std::vector<int>& world_ranks, double timeout_s,
                 std::function<void()> on_timeout)
    : id_(Watchdog::get().add({operation, group, world_ranks, timeout_s, deadline_of(timeout_s), std::move(on_timeout), {}})) {}

Watched::~Watched() { Watchdog::get().remove(id_); }

void watch_until(const char* operation, const std::string& group, const std::vector<int>& world_ranks, double timeout_s,
                 std::function<bool()> completed, std::function<void()> on_timeout) {
  Watchdog::get().add({operation, group, world_ranks, timeout_s, deadline_of(timeout_s), std::move(on_timeout), std::move(completed)});
}

void set_timeout_handler(std::function<void(const std::string& message)> handler) { Watchdog::get().set_handler(std::move(handler)); }

}  // namespace moeforge
