#include "parallel/comm/work.h"

#include <atomic>
#include <chrono>
#include <ctime>

namespace moeforge {

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double thread_cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
}

thread_local bool t_on_comm_thread = false;
std::atomic<int> g_compute_waiting{0};

struct InFlightClock {
  std::mutex mutex;
  int in_flight = 0;
  double since = 0;
  CommTimes totals;
};
InFlightClock& clock() {
  static InFlightClock c;
  return c;
}

class Completed : public Work {
 public:
  void wait() override {}
  bool is_completed() override { return true; }
};

}  // namespace

std::shared_ptr<Work> completed_work() { return std::make_shared<Completed>(); }

bool on_comm_thread() { return t_on_comm_thread; }

CommTimes comm_times() {
  InFlightClock& c = clock();
  std::lock_guard lock(c.mutex);
  CommTimes t = c.totals;
  if (c.in_flight > 0) t.in_flight_s += now_s() - c.since;
  return t;
}

namespace {

void in_flight_begin() {
  InFlightClock& c = clock();
  std::lock_guard lock(c.mutex);
  if (c.in_flight++ == 0) c.since = now_s();
}

void in_flight_end() {
  InFlightClock& c = clock();
  std::lock_guard lock(c.mutex);
  if (--c.in_flight == 0) c.totals.in_flight_s += now_s() - c.since;
}

}  // namespace

CommInFlight::CommInFlight() { in_flight_begin(); }

CommInFlight::~CommInFlight() { in_flight_end(); }

bool compute_waiting() { return g_compute_waiting.load(std::memory_order_relaxed) > 0; }

ExposedWait::ExposedWait() : counted_(!t_on_comm_thread), start_(counted_ ? now_s() : 0) {
  if (counted_) ++g_compute_waiting;
}

ExposedWait::~ExposedWait() {
  if (!counted_) return;
  --g_compute_waiting;
  InFlightClock& c = clock();
  std::lock_guard lock(c.mutex);
  c.totals.exposed_s += now_s() - start_;
}

// One submitted operation: its state is the Work handle.
struct CommThread::Task : public Work {
  std::function<void()> op;
  std::mutex mutex;
  std::condition_variable done_changed;
  bool done = false;
  std::exception_ptr error;

  void wait() override {
    std::unique_lock lock(mutex);
    if (done) return rethrow();
    const ExposedWait exposed;
    done_changed.wait(lock, [&] { return done; });
    rethrow();
  }
  bool is_completed() override {
    std::lock_guard lock(mutex);
    return done;
  }
  void rethrow() const {
    if (error) std::rethrow_exception(error);
  }
};

std::shared_ptr<Work> CommThread::submit(std::function<void()> op) {
  auto task = std::make_shared<Task>();
  task->op = std::move(op);
  in_flight_begin();  // in flight from submission (queued counts) to completion
  {
    std::lock_guard lock(mutex_);
    if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
    queue_.push_back(task);
  }
  changed_.notify_one();
  return task;
}

void CommThread::run() {
  t_on_comm_thread = true;
  while (true) {
    std::shared_ptr<Task> task;
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything submitted has run
      task = queue_.front();
      queue_.pop_front();
    }
    std::exception_ptr error;
    const double cpu_start = thread_cpu_s();
    try {
      task->op();
    } catch (...) {
      error = std::current_exception();
    }
    {
      InFlightClock& c = clock();
      std::lock_guard lock(c.mutex);
      c.totals.comm_thread_cpu_s += thread_cpu_s() - cpu_start;
    }
    task->op = nullptr;  // release the tensors it holds
    {
      std::lock_guard lock(task->mutex);
      task->error = error;
      task->done = true;
    }
    task->done_changed.notify_all();
    in_flight_end();
  }
}

CommThread::~CommThread() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_one();
  if (thread_.joinable()) thread_.join();
}

}  // namespace moeforge
