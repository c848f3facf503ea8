// defines: stream_check::{enabled, OpAccesses, note_op, stream_waited, event_recorded, event_blocked, event_destroyed,
// host_waited_event, host_waited_stream, host_waited_device, host_waited_copy, block_freed}; and for moeforge
// (dlsym): moeforge_emulated_stream_races, moeforge_emulated_stream_races_reset
//
// Note [stream-order checker]: with MOEFORGE_EMULATED_STREAM_CHECK=1 the emulator checks that work on
// different streams touching the same memory is ordered by events or synchronisation, as CUDA would
// need it to be (what PyTorch's CUDA sanitizer checks, as a model of happens-before):
// - Each stream and each host thread has a vector clock (stream -> count of its ops). An op issued on
//   stream S (its device's current stream on the issuing thread) first takes in the thread's clock
//   (what that thread has waited for), then counts itself on S.
// - Recording an event copies S's clock into it; a stream waiting on the event takes it in. A host
//   wait (event or stream synchronize, device synchronize, a blocking copy to the host, .item())
//   takes the waited-for clocks into the thread's clock; querying an event does not.
// - Each storage (its allocation, shared by views) keeps its last write and the reads since. An
//   access on T races with a write on W != T that T's clock has not reached; a write also races
//   with reads on other streams not reached. Which tensors an op reads and writes comes from its
//   schema (`Tensor(a!)` arguments are written, other tensor arguments read, fresh results written).
// - When the allocator takes a block back, any other stream that used it and was not named by
//   recordStream must be reached by the allocation stream's clock joined with the freeing thread's:
//   the caching allocator hands the block out again on that stream at once.
// Each race is counted and printed on stderr (the first 20 in full).
//
// What it cannot see: the emulator runs every op eagerly, in host order (Note [emulated device
// order]), so a race reported here does not change numbers on this machine; on a GPU it could.
// Host threads ordering each other (a join, a mutex, autograd handing backward to its device
// thread) are invisible: a host wait orders only the waiting thread's later ops. Host memory is not
// tracked (a CPU tensor reused under a non-blocking copy), nor ops that synchronise the host
// implicitly on CUDA (nonzero, masked_select): code that relies on those for ordering is reported.
// Accesses are per storage, not per byte: two streams writing disjoint halves of one allocation are
// reported too.
#pragma once

#include "core/device/emulated/emulated_runtime.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Stream.h>

#include <initializer_list>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace moeforge::emulated::stream_check {

// The one branch each op pays while the checker is off.
inline bool enabled() { return settings().stream_check; }

// The emulated tensors one op reads and writes, checked and recorded together by note().
class OpAccesses {
 public:
  void read(const at::Tensor& t) { add(t, false); }
  void write(const at::Tensor& t) { add(t, true); }
  // As op `op`, issued on `device`'s current stream on this thread: reports each race, then records
  // the accesses. Call it after the op ran (a result or a resized out= argument has its memory then).
  void note(const std::string& op, c10::DeviceIndex device);

 private:
  void add(const at::Tensor& t, bool write);
  std::vector<std::pair<at::Tensor, bool>> tensors_;
};

// note() for a kernel with fixed inputs and outputs (undefined ones are skipped).
void note_op(const std::string& op, c10::DeviceIndex device, std::initializer_list<at::Tensor> reads,
             std::initializer_list<at::Tensor> writes);

// `waiting` waits for all `waited_for` has been given so far (a copy between devices: CUDA makes the
// source's stream wait for the destination's before it, and the destination's for the source's after).
void stream_waited(const c10::Stream& waiting, const c10::Stream& waited_for);

// The device guard's events (keyed by the guard's event object) and waits.
void event_recorded(const void* event, const c10::Stream& stream);
void event_blocked(const void* event, const c10::Stream& stream);
void event_destroyed(const void* event);
void host_waited_event(const void* event);
void host_waited_stream(const c10::Stream& stream);
void host_waited_device(c10::DeviceIndex device);
// A copy to the host that returns with the data (CUDA synchronises the stream for it).
void host_waited_copy(c10::DeviceIndex device);

// The allocator took back the block at `base`, allocated on `allocated_on`; `recorded` are the streams
// recordStream named for it.
void block_freed(const void* base, const c10::Stream& allocated_on, const std::unordered_set<c10::Stream>& recorded);

}  // namespace moeforge::emulated::stream_check

extern "C" {
// Races reported since the library loaded or the last reset; 0 while the checker is off.
__attribute__((visibility("default"))) long long moeforge_emulated_stream_races(void);
__attribute__((visibility("default"))) void moeforge_emulated_stream_races_reset(void);
}
