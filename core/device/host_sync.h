// defines: host_syncs, count_host_sync, to_host, to_device, DeviceSyncCounter
//
// Every time the host waits for the device costs a GPU the queue it had: kernel launches stop until
// the device drains. The training step keeps these to the few it needs (each MoE layer's token counts
// for the dispatcher, the gradient norm for clipping and skipping, one read of the step's losses and
// expert loads, the step's end for its timings) and counts them: metrics.jsonl's `host_syncs`.
// Device-to-host reads on the training path go through to_host, host-to-device copies through
// to_device; tests/lint/device_factories.sh keeps the rest of the code from adding others.
//
// What is counted: on CPU, every to_host call and blocking device wait (where a GPU would wait:
// the CPU test of the count is the GPU's count); on CUDA, every synchronizing operation LibTorch
// reports (its sync debug mode: blocking copies either way, .item(), stream synchronizes, and
// LibTorch's own hidden ones such as nonzero) plus our blocking waits on events; on the emulated
// device, what it reports as CUDA's sync debug mode would (blocking copies to the host, .item(),
// stream and device synchronisations: not LibTorch's hidden ones, which run as CPU kernels there)
// plus our blocking waits.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>

namespace moeforge {

// Host synchronisations of this process so far.
int64_t host_syncs();
// A blocking wait for the device that LibTorch does not see (an event polled or synchronized).
void count_host_sync();

// `t` in host memory, contiguous; one counted synchronization.
torch::Tensor to_host(const torch::Tensor& t);
// A host tensor on `device` without blocking the host: through pinned memory when `device` is a
// GPU (the copy is ordered on the current stream; the staging buffer is freed after it).
torch::Tensor to_device(const torch::Tensor& host, const torch::Device& device);

// While alive on a training thread: the device's own report of host syncs counted (CUDA: LibTorch's
// sync debug mode on, its "called a synchronizing CUDA operation" warnings counted instead of
// printed, other warnings passed on; the emulated device: its host-sync callback), and to_host no
// longer counting itself. No-op for the CPU, for a device that reports none, and for CUDA in builds
// without CUDA.
class DeviceSyncCounter {
 public:
  explicit DeviceSyncCounter(const torch::Device& device);
  ~DeviceSyncCounter();
  DeviceSyncCounter(const DeviceSyncCounter&) = delete;
  DeviceSyncCounter& operator=(const DeviceSyncCounter&) = delete;

 private:
  struct State;
  std::unique_ptr<State> state_;
  void (*set_callback_)(void (*)(void)) = nullptr;  // the emulated device's
};

}  // namespace moeforge
