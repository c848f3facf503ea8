#include "core/device/host_sync.h"

#include <atomic>
#include <string>

#ifdef MOEFORGE_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace moeforge {

namespace {
std::atomic<int64_t> g_syncs{0};
// True while a CudaSyncCounter counts LibTorch's synchronizations: to_host must not count twice.
std::atomic<bool> g_cuda_counted{false};
}  // namespace

int64_t host_syncs() { return g_syncs.load(std::memory_order_relaxed); }

void count_host_sync() { g_syncs.fetch_add(1, std::memory_order_relaxed); }

torch::Tensor to_host(const torch::Tensor& t) {
  if (!(t.is_cuda() && g_cuda_counted.load(std::memory_order_relaxed))) count_host_sync();
  return t.to(torch::kCPU).contiguous();
}

torch::Tensor to_device(const torch::Tensor& host, const torch::Device& device) {
  if (!device.is_cuda()) return host.to(device);
  return host.contiguous().pin_memory().to(device, /*non_blocking=*/true);
}

#ifdef MOEFORGE_WITH_CUDA
namespace {
// The message of c10::cuda::warn_or_error_on_sync.
constexpr std::string_view kSyncWarning = "called a synchronizing CUDA operation";

class CountingHandler : public c10::WarningHandler {
 public:
  explicit CountingHandler(c10::WarningHandler* next) : next_(next) {}
  void process(const c10::Warning& warning) override {
    if (warning.msg().find(kSyncWarning) != std::string::npos) {
      count_host_sync();
    } else {
      next_->process(warning);
    }
  }

 private:
  c10::WarningHandler* next_;
};
}  // namespace

struct CudaSyncCounter::State {
  explicit State() : handler(c10::WarningUtils::get_warning_handler()), guard(&handler) {}
  CountingHandler handler;
  c10::WarningUtils::WarningHandlerGuard guard;
  c10::cuda::SyncDebugMode previous = c10::cuda::warning_state().get_sync_debug_mode();
};

CudaSyncCounter::CudaSyncCounter(const torch::Device& device) {
  if (!device.is_cuda()) return;
  state_ = std::make_unique<State>();
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
  g_cuda_counted = true;
}

CudaSyncCounter::~CudaSyncCounter() {
  if (!state_) return;
  g_cuda_counted = false;
  c10::cuda::warning_state().set_sync_debug_mode(state_->previous);
}
#else
struct CudaSyncCounter::State {};
CudaSyncCounter::CudaSyncCounter(const torch::Device&) {}
CudaSyncCounter::~CudaSyncCounter() = default;
#endif

}  // namespace moeforge
