#include "parallel/comm/async_error.h"

#include "parallel/comm/watchdog.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <memory>
#include <utility>

namespace moeforge {

AsyncError::AsyncError(std::string group, std::vector<int> world_ranks, double grace_s)
    : group_(std::move(group)), world_ranks_(std::move(world_ranks)), grace_s_(grace_s),
      claimed_(std::make_shared<std::atomic<bool>>(false)) {}

void AsyncError::record(const char* backend, const char* operation, const std::string& what) {
  std::string message;
  {
    const std::lock_guard lock(mutex_);
    if (failed()) return;
    message_ = fmt::format("{} {} on group {} (world ranks [{}]) failed: {}. A peer is dead or diverged (every rank must "
                           "make the same calls in the same order), or the network failed",
                           backend, operation, group_, fmt::join(world_ranks_, ", "), what);
    message = message_;
    failed_.store(true, std::memory_order_release);
  }
  end_job_unless_claimed(message, grace_s_, [claimed = claimed_] { return claimed->load(); });
}

void AsyncError::rethrow() {
  if (!failed()) return;
  claimed_->store(true);
  const std::lock_guard lock(mutex_);
  throw CommError(message_);
}

}  // namespace moeforge
