#include "core/device/host_sync.h"

#include <dlfcn.h>

#include <atomic>
#include <string>

#ifdef MOEFORGE_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace moeforge {

namespace {
std::atomic<int64_t> g_syncs{0};
// True while a DeviceSyncCounter counts the device's own reports: to_host must not count twice.
std::atomic<bool> g_device_counted{false};
}  // namespace

int64_t host_syncs() { return g_syncs.load(std::memory_order_relaxed); }

void count_host_sync() { g_syncs.fetch_add(1, std::memory_order_relaxed); }

torch::Tensor to_host(const torch::Tensor& t) {
  if (t.is_cpu() || !g_device_counted.load(std::memory_order_relaxed)) count_host_sync();
  return t.to(torch::kCPU).contiguous();
}

torch::Tensor to_device(const torch::Tensor& host, const torch::Device& device) {
  if (!device.is_cuda()) return host.to(device);
  return host.contiguous().pin_memory().to(device, /*non_blocking=*/true);
}

#ifdef MOEFORGE_WITH_CUDA
struct DeviceSyncCounter::State {
  // Counts LibTorch's sync warnings (c10::cuda::warn_or_error_on_sync's message) as host syncs
  // and passes every other warning on. A member class, not one in an anonymous namespace: a field
  // of this class may not have a type of internal linkage.
  class CountingHandler : public c10::WarningHandler {
   public:
    explicit CountingHandler(c10::WarningHandler* next) : next_(next) {}
    void process(const c10::Warning& warning) override {
      if (warning.msg().find("called a synchronizing CUDA operation") != std::string::npos) {
        count_host_sync();
      } else {
        next_->process(warning);
      }
    }

   private:
    c10::WarningHandler* next_;
  };

  explicit State() : handler(c10::WarningUtils::get_warning_handler()), guard(&handler) {}
  CountingHandler handler;
  c10::WarningUtils::WarningHandlerGuard guard;
  c10::cuda::SyncDebugMode previous = c10::cuda::warning_state().get_sync_debug_mode();
};
#else
struct DeviceSyncCounter::State {};
#endif

DeviceSyncCounter::DeviceSyncCounter(const torch::Device& device) {
  if (device.is_cuda()) {
#ifdef MOEFORGE_WITH_CUDA
    state_ = std::make_unique<State>();
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
    g_device_counted = true;
#endif
    return;
  }
  if (device.is_cpu()) return;
  // The emulated device's report (core/device/emulated/emulated_runtime.h); a vendor's backend has
  // none, and to_host keeps counting itself there.
  set_callback_ = reinterpret_cast<void (*)(void (*)(void))>(dlsym(RTLD_DEFAULT, "moeforge_emulated_on_host_sync"));
  if (set_callback_ == nullptr) return;
  set_callback_(&count_host_sync);
  g_device_counted = true;
}

DeviceSyncCounter::~DeviceSyncCounter() {
  if (set_callback_ != nullptr) {
    set_callback_(nullptr);
    g_device_counted = false;
  }
#ifdef MOEFORGE_WITH_CUDA
  if (!state_) return;
  g_device_counted = false;
  c10::cuda::warning_state().set_sync_debug_mode(state_->previous);
#endif
}

}  // namespace moeforge
