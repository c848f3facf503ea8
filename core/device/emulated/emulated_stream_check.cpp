#include "core/device/emulated/emulated_stream_check.h"

#include "core/device/emulated/emulated_allocator.h"

#include <algorithm>
#include <atomic>
#include <compare>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <unordered_map>

namespace moeforge::emulated::stream_check {
namespace {

constexpr auto kType = c10::DeviceType::PrivateUse1;
constexpr long long kPrintedRaces = 20;

struct StreamKey {
  c10::DeviceIndex device = 0;
  c10::StreamId id = 0;
  auto operator<=>(const StreamKey&) const = default;
};

StreamKey key_of(const c10::Stream& stream) { return {stream.device_index(), stream.id()}; }

// Per stream, how many of its ops are known to have happened.
using Clock = std::map<StreamKey, uint64_t>;

uint64_t count_in(const Clock& clock, StreamKey stream) {
  const auto it = clock.find(stream);
  return it == clock.end() ? 0 : it->second;
}

void take_in(Clock& into, const Clock& from) {
  for (const auto& [stream, count] : from) {
    uint64_t& mine = into[stream];
    mine = std::max(mine, count);
  }
}

struct Access {
  StreamKey stream;
  uint64_t tick = 0;  // the stream's count for the accessing op
  std::string op;
  std::vector<int64_t> shape;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
};

struct StorageUse {
  std::optional<Access> write;         // the last one
  std::map<StreamKey, Access> reads;  // since it, the latest per stream
};

struct State {
  std::mutex mutex;
  std::map<StreamKey, Clock> streams;
  std::unordered_map<std::thread::id, Clock> hosts;  // what each host thread has waited for
  std::unordered_map<const void*, Clock> events;     // the recording stream's clock
  std::unordered_map<const void*, StorageUse> storages;  // by allocation base
  std::atomic<long long> races{0};
};

// Never destroyed: blocks may be freed during static destruction.
State& state() {
  static auto* s = new State();
  return *s;
}

Clock& host_clock(State& st) { return st.hosts[std::this_thread::get_id()]; }

std::string where(StreamKey stream) {
  return "emulated:" + std::to_string(static_cast<int>(stream.device)) + " stream " + std::to_string(stream.id);
}

// "stream M", with its device only when it is not `here`'s.
std::string other_stream(StreamKey stream, StreamKey here) {
  return stream.device == here.device ? "stream " + std::to_string(stream.id) : where(stream);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i > 0 ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

// Counts a race; prints the first kPrintedRaces since the last reset.
void report(State& st, const std::string& text) {
  const long long n = ++st.races;
  if (n <= kPrintedRaces) std::fprintf(stderr, "moeforge emulated: stream-order race: %s\n", text.c_str());
  if (n == kPrintedRaces) {
    std::fprintf(stderr, "moeforge emulated: further stream-order races are counted, not printed "
                         "(moeforge_emulated_stream_races)\n");
  }
}

std::string access_race(const Access& now, bool writes, const Access& before, bool before_wrote) {
  return now.op + (writes ? " writes" : " reads") + " a tensor of shape " + shape_text(now.shape) + " " +
         c10::toString(now.dtype) + " on " + where(now.stream) + ", last " + (before_wrote ? "written" : "read") +
         " by " + before.op + " (shape " + shape_text(before.shape) + ") on " +
         other_stream(before.stream, now.stream) + ", and no event wait or synchronisation orders the two";
}

// Checks `now` (on a stream whose clock is `clock`) against the storage's earlier accesses, then
// records it.
void check_and_record(State& st, StorageUse& use, Access now, bool writes, const Clock& clock) {
  const std::optional<Access>& last = use.write;
  if (last.has_value() && last->stream != now.stream && count_in(clock, last->stream) < last->tick) {
    report(st, access_race(now, writes, *last, true));
  }
  if (!writes) {
    use.reads[now.stream] = std::move(now);
    return;
  }
  for (const auto& [stream, read] : use.reads) {
    if (stream != now.stream && count_in(clock, stream) < read.tick) report(st, access_race(now, true, read, false));
  }
  use.reads.clear();
  use.write = std::move(now);
}

// Each stream's latest access of a storage.
std::map<StreamKey, const Access*> latest_per_stream(const StorageUse& use) {
  std::map<StreamKey, const Access*> latest;
  if (use.write.has_value()) latest[use.write->stream] = &*use.write;
  for (const auto& [stream, read] : use.reads) {
    const Access*& l = latest[stream];
    if (l == nullptr || read.tick > l->tick) l = &read;
  }
  return latest;
}

}  // namespace

void OpAccesses::add(const at::Tensor& t, bool write) {
  if (t.defined() && t.device().type() == kType && t.has_storage()) tensors_.emplace_back(t, write);
}

void OpAccesses::note(const std::string& op, c10::DeviceIndex device) {
  // One access per storage (views of one allocation are one), a write where any is.
  struct Use {
    const void* base;
    const at::Tensor* tensor;
    bool write;
  };
  std::vector<Use> uses;
  const c10::DeleterFnPtr ours = allocator().raw_deleter();
  for (const auto& [t, write] : tensors_) {
    const c10::DataPtr& data = t.storage().data_ptr();
    if (data.get() == nullptr || data.get_deleter() != ours) continue;
    const auto same = std::find_if(uses.begin(), uses.end(), [&](const Use& u) { return u.base == data.get(); });
    if (same == uses.end()) {
      uses.push_back({data.get(), &t, write});
    } else if (write && !same->write) {
      *same = {data.get(), &t, true};
    }
  }
  if (uses.empty()) return;
  const StreamKey stream = key_of(current_stream(device));
  State& st = state();
  const std::lock_guard lock(st.mutex);
  Clock& clock = st.streams[stream];
  take_in(clock, host_clock(st));
  const uint64_t tick = ++clock[stream];
  for (const Use& u : uses) {
    Access now{stream, tick, op, u.tensor->sizes().vec(), u.tensor->scalar_type()};
    check_and_record(st, st.storages[u.base], std::move(now), u.write, clock);
  }
}

void note_op(const std::string& op, c10::DeviceIndex device, std::initializer_list<at::Tensor> reads,
             std::initializer_list<at::Tensor> writes) {
  OpAccesses accesses;
  for (const at::Tensor& t : reads) accesses.read(t);
  for (const at::Tensor& t : writes) accesses.write(t);
  accesses.note(op, device);
}

void stream_waited(const c10::Stream& waiting, const c10::Stream& waited_for) {
  State& st = state();
  const std::lock_guard lock(st.mutex);
  const Clock& done = st.streams[key_of(waited_for)];
  take_in(st.streams[key_of(waiting)], done);
}

void event_recorded(const void* event, const c10::Stream& stream) {
  State& st = state();
  const std::lock_guard lock(st.mutex);
  Clock& clock = st.streams[key_of(stream)];
  // The record is queued after whatever this thread waited for, as an op would be.
  take_in(clock, host_clock(st));
  st.events[event] = clock;
}

void event_blocked(const void* event, const c10::Stream& stream) {
  State& st = state();
  const std::lock_guard lock(st.mutex);
  const auto it = st.events.find(event);
  if (it != st.events.end()) take_in(st.streams[key_of(stream)], it->second);  // never recorded: no wait, as CUDA
}

void event_destroyed(const void* event) {
  State& st = state();
  const std::lock_guard lock(st.mutex);
  st.events.erase(event);
}

void host_waited_event(const void* event) {
  State& st = state();
  const std::lock_guard lock(st.mutex);
  const auto it = st.events.find(event);
  if (it != st.events.end()) take_in(host_clock(st), it->second);
}

void host_waited_stream(const c10::Stream& stream) {
  State& st = state();
  const std::lock_guard lock(st.mutex);
  take_in(host_clock(st), st.streams[key_of(stream)]);
}

void host_waited_device(c10::DeviceIndex device) {
  State& st = state();
  const std::lock_guard lock(st.mutex);
  Clock& host = host_clock(st);
  for (const auto& [stream, clock] : st.streams) {
    if (stream.device == device) take_in(host, clock);
  }
}

void host_waited_copy(c10::DeviceIndex device) { host_waited_stream(current_stream(device)); }

void block_freed(const void* base, const c10::Stream& allocated_on, const std::unordered_set<c10::Stream>& recorded) {
  State& st = state();
  const std::lock_guard lock(st.mutex);
  const auto it = st.storages.find(base);
  if (it == st.storages.end()) return;
  // Forgotten whatever it holds: a reused block starts clean.
  const StorageUse use = std::move(it->second);
  st.storages.erase(it);
  const StreamKey home = key_of(allocated_on);
  Clock reached = st.streams[home];
  take_in(reached, host_clock(st));
  for (const auto& [stream, access] : latest_per_stream(use)) {
    const c10::Stream other(c10::Stream::UNSAFE, c10::Device(kType, stream.device), stream.id);
    if (stream == home || recorded.contains(other) || count_in(reached, stream) >= access->tick) continue;
    report(st, "a tensor of shape " + shape_text(access->shape) + " " + c10::toString(access->dtype) +
                   " on emulated:" + std::to_string(static_cast<int>(home.device)) + " freed on stream " +
                   std::to_string(home.id) + " while " + other_stream(stream, home) + " may still use it (last " +
                   access->op + "); recordStream or an event wait is missing");
  }
}

}  // namespace moeforge::emulated::stream_check

long long moeforge_emulated_stream_races(void) { return moeforge::emulated::stream_check::state().races.load(); }

void moeforge_emulated_stream_races_reset(void) { moeforge::emulated::stream_check::state().races = 0; }
