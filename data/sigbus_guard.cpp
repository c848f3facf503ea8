#include "data/sigbus_guard.h"

#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <unistd.h>

namespace moeforge::data {

namespace {

// Fixed storage: the handler may only read memory that exists without allocating.
struct Slot {
  std::atomic<uintptr_t> begin{0};  // 0: free; published last, after end and message
  uintptr_t end = 0;
  char message[1200] = {};
  size_t length = 0;
};
constexpr size_t kSlots = 512;
Slot g_slots[kSlots];
std::mutex g_mutex;  // registration only, never in the handler
bool g_installed = false;

void on_sigbus(int signal, siginfo_t* info, void*) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (auto& slot : g_slots) {
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    if (begin != 0 && addr >= begin && addr < slot.end) {
      [[maybe_unused]] const auto n = ::write(STDERR_FILENO, slot.message, slot.length);
      ::_exit(1);
    }
  }
  // Not a dataset file: the default action (core dump) on return, when the access faults again.
  std::signal(signal, SIG_DFL);
}

void append(Slot& s, const char* text) {
  const size_t n = std::min(std::strlen(text), sizeof(s.message) - 1 - s.length);
  std::memcpy(s.message + s.length, text, n);
  s.length += n;
}

}  // namespace

void guard_mapping(const void* begin, size_t size, const std::string& path) {
  if (begin == nullptr || size == 0) return;
  std::lock_guard lock(g_mutex);
  if (!g_installed) {
    struct sigaction action {};
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    ::sigaction(SIGBUS, &action, nullptr);
    g_installed = true;
  }
  for (auto& slot : g_slots) {
    if (slot.begin.load(std::memory_order_relaxed) != 0) continue;
    slot.end = reinterpret_cast<uintptr_t>(begin) + size;
    slot.length = 0;
    append(slot, "error: reading ");
    append(slot, path.c_str());
    append(slot, " (memory-mapped) failed with SIGBUS: the file was truncated, replaced or its storage became "
                 "unreadable while this job ran. Restore the file, then resume from the last checkpoint.\n");
    slot.begin.store(reinterpret_cast<uintptr_t>(begin), std::memory_order_release);
    return;
  }
  // More open dataset files than slots: the rest are unguarded (a SIGBUS then has no message).
}

void unguard_mapping(const void* begin) {
  std::lock_guard lock(g_mutex);
  for (auto& slot : g_slots) {
    if (slot.begin.load(std::memory_order_relaxed) == reinterpret_cast<uintptr_t>(begin)) slot.begin.store(0);
  }
}

}  // namespace moeforge::data
