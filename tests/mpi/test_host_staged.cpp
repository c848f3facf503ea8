// HostStagedCommunicator (parallel/comm/host_staged_communicator.h) on the emulated accelerator, one
// device per rank: every collective and point-to-point call against closed forms (rank r of n
// contributes values made from r), fp32 and bf16, with the stream-order checker on. Each input is
// written by a kernel on the caller's stream and read on the communication stream, and each result
// is written there and read back on the caller's, so a missing event wait or recordStream is a race
// the checker counts; the last test case requires none. A blocking call's host wait orders all that
// follows it, so those bugs show in the asynchronous calls: their results are read after wait()
// alone, and their inputs are temporaries freed while the call is in flight. Run by ctest under
// `mpirun -np 3`.
#include "parallel/comm/host_staged_communicator.h"

#include "parallel/comm/async_error.h"

#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <thread>

using namespace moeforge;
using Catch::Matchers::Contains;

namespace {

// This rank's emulated device, current on this thread. The emulator reads its settings when it is
// loaded, so they are set first.
c10::Device load_emulated_device() {
  const MpiRuntime node;  // MPI is up (main.cpp): this only reads the node-local rank and size
  setenv("MOEFORGE_EMULATED_DEVICES", std::to_string(node.local_size()).c_str(), 1);
  setenv("MOEFORGE_EMULATED_STREAM_CHECK", "1", 1);
  if (dlopen(MOEFORGE_EMULATED_LIBRARY, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    throw std::runtime_error(fmt::format("loading {}: {}", MOEFORGE_EMULATED_LIBRARY, dlerror()));
  }
  const c10::Device device(c10::DeviceType::PrivateUse1, static_cast<c10::DeviceIndex>(node.local_rank()));
  c10::impl::getDeviceGuardImpl(device.type())->setDevice(device);
  return device;
}

struct Fixture {
  c10::Device device = load_emulated_device();
  std::shared_ptr<MpiCommunicator> world = MpiCommunicator::world(60.0);
  HostStagedCommunicator comm{world, device};
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

torch::TensorOptions on_device(torch::Dtype dtype) { return torch::TensorOptions().device(fixture().device).dtype(dtype); }

// `value` everywhere, written by a kernel on the caller's stream, as a training step's output is.
torch::Tensor computed(c10::IntArrayRef sizes, double value, torch::Dtype dtype) {
  return torch::full(sizes, 1.0, on_device(dtype)).mul_(value);
}

// A device result against its closed form (fp32, exact), read back on the caller's stream.
bool equals(const torch::Tensor& result, const torch::Tensor& expected, torch::Dtype dtype) {
  return result.device() == fixture().device && result.scalar_type() == dtype &&
         torch::equal(result.cpu().to(torch::kFloat32), expected);
}

// The rows rank `sender` sends `receiver` in the all-to-all: sender + receiver + 1 of them (uneven
// both ways), each (sender, receiver, row index).
torch::Tensor rows_between(int sender, int receiver, const torch::TensorOptions& options) {
  const int64_t rows = sender + receiver + 1;
  return torch::stack(
      {torch::full({rows}, sender, options), torch::full({rows}, receiver, options), torch::arange(rows, options)}, 1);
}

long long stream_races() {
  using Count = long long (*)();
  const auto count = reinterpret_cast<Count>(dlsym(RTLD_DEFAULT, "moeforge_emulated_stream_races"));
  if (count == nullptr) throw std::runtime_error("the emulator does not export moeforge_emulated_stream_races");
  return count();
}

constexpr torch::Dtype kDtypes[] = {torch::kFloat32, torch::kBFloat16};

}  // namespace

TEST_CASE("host-staged all_reduce: sum, avg and max, blocking and several asynchronous in flight", "[device][mpi]") {
  auto& comm = fixture().comm;
  const int n = comm.size(), r = comm.rank();
  for (const auto dtype : kDtypes) {
    INFO(c10::toString(dtype));
    const std::pair<ReduceOp, float> blocking[] = {
        {ReduceOp::sum, static_cast<float>(n * (n + 1))}, {ReduceOp::avg, n + 1.0F}, {ReduceOp::max, 2.0F * n}};
    for (const auto& [op, expected] : blocking) {
      auto t = computed({1000}, 2.0 * (r + 1), dtype);
      comm.all_reduce(t, op);
      CHECK(equals(t, torch::full({1000}, expected), dtype));
    }
    // No blocking call among them: its host wait would order the results' reads without wait().
    std::vector<torch::Tensor> tensors;
    std::vector<std::shared_ptr<Work>> work;
    for (int k = 0; k < 5; ++k) {
      tensors.push_back(computed({1 + k * 1000}, r + k, dtype));
      work.push_back(comm.all_reduce_async(tensors.back(), k % 2 ? ReduceOp::sum : ReduceOp::max));
    }
    for (int k = 0; k < 5; ++k) {
      INFO("tensor " << k);
      work[static_cast<size_t>(k)]->wait();
      const float expected = k % 2 ? static_cast<float>(n * (n - 1) / 2 + n * k) : static_cast<float>(n - 1 + k);
      CHECK(equals(tensors[static_cast<size_t>(k)], torch::full({1 + k * 1000}, expected), dtype));
    }
  }
}

TEST_CASE("host-staged all_gather and reduce_scatter, blocking and asynchronous", "[device][mpi]") {
  auto& comm = fixture().comm;
  const int n = comm.size(), r = comm.rank();
  const auto base_23 = torch::arange(6, torch::kFloat32).view({2, 3});
  std::vector<torch::Tensor> gathered;
  for (int p = 0; p < n; ++p) gathered.push_back(base_23 + 10.0F * static_cast<float>(p));
  const auto expected_gather = torch::cat(gathered);
  // Rows [2r, 2r + 2) of a (2n, 3) arange, which every rank offsets by its rank.
  const auto mine_23 = torch::arange(6 * n, torch::kFloat32).view({2 * n, 3}).narrow(0, 2 * r, 2);
  const std::pair<ReduceOp, torch::Tensor> scattered[] = {
      {ReduceOp::sum, mine_23 * static_cast<float>(n) + n * (n - 1) / 2.0F},
      {ReduceOp::avg, mine_23 + (n - 1) / 2.0F},
      {ReduceOp::max, mine_23 + static_cast<float>(n - 1)}};
  for (const auto dtype : kDtypes) {
    INFO(c10::toString(dtype));
    const auto x = [&] { return torch::arange(6, on_device(dtype)).view({2, 3}).add_(10 * r); };
    CHECK(equals(comm.all_gather(x()), expected_gather, dtype));
    // Asynchronous calls on temporaries, freed before wait(): only recordStream keeps their memory.
    torch::Tensor out;
    auto work = comm.all_gather_async(x(), out);
    work->wait();
    CHECK(equals(out, expected_gather, dtype));

    const auto y = [&] { return torch::arange(6 * n, on_device(dtype)).view({2 * n, 3}).add_(r); };
    for (const auto& [op, expected] : scattered) CHECK(equals(comm.reduce_scatter(y(), op), expected, dtype));
    work = comm.reduce_scatter_async(y(), out, ReduceOp::sum);
    work->wait();
    CHECK(equals(out, scattered[0].second, dtype));
  }
}

TEST_CASE("host-staged all_to_all with uneven rows, blocking and asynchronous", "[device][mpi]") {
  auto& comm = fixture().comm;
  const int n = comm.size(), r = comm.rank();
  std::vector<int64_t> send_rows, recv_rows;
  std::vector<torch::Tensor> expected_parts;
  for (int p = 0; p < n; ++p) {
    send_rows.push_back(r + p + 1);
    recv_rows.push_back(p + r + 1);
    expected_parts.push_back(rows_between(p, r, torch::kFloat32));
  }
  const auto expected = torch::cat(expected_parts);
  for (const auto dtype : kDtypes) {
    INFO(c10::toString(dtype));
    const auto x = [&] {
      std::vector<torch::Tensor> parts;
      for (int p = 0; p < n; ++p) parts.push_back(rows_between(r, p, on_device(dtype)));
      return torch::cat(parts);
    };
    CHECK(equals(comm.all_to_all(x(), send_rows, recv_rows), expected, dtype));
    torch::Tensor out;
    auto work = comm.all_to_all_async(x(), out, send_rows, recv_rows);  // its input freed before wait()
    work->wait();
    CHECK(equals(out, expected, dtype));
  }
}

TEST_CASE("host-staged broadcast from the last rank", "[device][mpi]") {
  auto& comm = fixture().comm;
  const int n = comm.size(), r = comm.rank();
  for (const auto dtype : kDtypes) {
    INFO(c10::toString(dtype));
    auto t = computed({7}, 5.0 * r + 1, dtype);
    comm.broadcast(t, n - 1);
    CHECK(equals(t, torch::full({7}, 5.0F * (n - 1) + 1), dtype));
  }
}

TEST_CASE("host-staged point-to-point over Transport::device: send/recv and send_recv rings", "[device][mpi]") {
  auto& comm = fixture().comm;
  const int n = comm.size(), r = comm.rank();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  for (const auto dtype : kDtypes) {
    INFO(c10::toString(dtype));
    const auto sent = computed({5}, r + 0.5, dtype);
    auto received = torch::zeros({5}, on_device(dtype));
    // Even ranks send first, so each blocking send meets a receive.
    if (r % 2 == 0) comm.send(sent, next, 1, Transport::device);
    comm.recv(received, prev, 1, Transport::device);
    if (r % 2 != 0) comm.send(sent, next, 1, Transport::device);
    CHECK(equals(received, torch::full({5}, prev + 0.5F), dtype));

    received = torch::zeros({5}, on_device(dtype));
    comm.send_recv(computed({5}, 2.0 * r, dtype), next, received, prev, 2, Transport::device);
    CHECK(equals(received, torch::full({5}, 2.0F * prev), dtype));
  }
}

TEST_CASE("host-staged send_async does not hold the communication thread: every rank sends 16 MB first",
          "[device][mpi]") {
  auto& comm = fixture().comm;
  const int n = comm.size(), r = comm.rank();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  // Beyond MPI's eager limit: a send that waited for its receive on the thread would queue every
  // rank's receive behind it, and no rank would receive.
  const int64_t elements = 4LL << 20;
  auto sending = comm.send_async(computed({elements}, r + 1.0, torch::kFloat32), next, 3, Transport::device);
  auto received = torch::zeros({elements}, on_device(torch::kFloat32));
  comm.recv(received, prev, 3, Transport::device);
  sending->wait();
  CHECK(sending->is_completed());
  CHECK(equals(received, torch::full({elements}, prev + 1.0F), torch::kFloat32));
}

TEST_CASE("host-staged exchange: two messages each way with each neighbour, matched by tag", "[device][mpi]") {
  auto& comm = fixture().comm;
  const int n = comm.size(), r = comm.rank();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  // Message k of rank s (k = 0, 1 to its next rank, 2, 3 to its previous) carries 4s + k, tag 10 + k.
  for (const auto dtype : kDtypes) {
    INFO(c10::toString(dtype));
    std::vector<PeerMessage> messages;
    for (int k = 0; k < 4; ++k) messages.push_back({computed({3}, 4.0 * r + k, dtype), k < 2 ? next : prev, 10 + k, true});
    for (int k = 0; k < 4; ++k) messages.push_back({torch::zeros({3}, on_device(dtype)), k < 2 ? prev : next, 10 + k, false});
    comm.exchange(messages, Transport::device)->wait();
    for (int k = 0; k < 4; ++k) {
      INFO("message " << k);
      const int sender = k < 2 ? prev : next;
      CHECK(equals(messages[static_cast<size_t>(4 + k)].tensor, torch::full({3}, 4.0F * sender + k), dtype));
    }
  }
}

TEST_CASE("host-staged communicator with CPU tensors: the MPI group's calls", "[device][mpi]") {
  auto& comm = fixture().comm;
  const int n = comm.size(), r = comm.rank();
  auto t = torch::full({5}, static_cast<float>(r + 1));
  comm.all_reduce(t, ReduceOp::sum);
  CHECK(torch::equal(t, torch::full({5}, n * (n + 1) / 2.0F)));
  auto a = torch::full({4}, static_cast<float>(r), torch::kBFloat16);
  comm.all_reduce_async(a, ReduceOp::max)->wait();
  CHECK(torch::equal(a.to(torch::kFloat32), torch::full({4}, static_cast<float>(n - 1))));
  const auto g = comm.all_gather(torch::full({1}, static_cast<float>(r)));
  CHECK((g.is_cpu() && torch::equal(g, torch::arange(n, torch::kFloat32))));
  auto received = torch::zeros({2});
  comm.send_recv(torch::full({2}, static_cast<float>(r)), (r + 1) % n, received, (r + n - 1) % n, 4, Transport::host);
  CHECK(torch::equal(received, torch::full({2}, static_cast<float>((r + n - 1) % n))));
}

TEST_CASE("host-staged misuse is refused in the caller's thread, naming the call", "[device][mpi]") {
  auto& comm = fixture().comm;
  const int next = (comm.rank() + 1) % comm.size();
  auto transposed = torch::ones({4, 2}, on_device(torch::kFloat32)).t();
  CHECK_THROWS_AS(comm.all_reduce(transposed, ReduceOp::sum), std::invalid_argument);
  CHECK_THROWS_WITH(comm.all_reduce(transposed, ReduceOp::sum), Contains("all_reduce") && Contains("non-contiguous"));
  CHECK_THROWS_WITH(comm.all_gather(transposed), Contains("all_gather") && Contains("non-contiguous"));

  const auto on_device_tensor = torch::ones({2}, on_device(torch::kFloat32));
  CHECK_THROWS_AS(comm.send(on_device_tensor, next, 5, Transport::host), std::invalid_argument);
  CHECK_THROWS_WITH(comm.send(on_device_tensor, next, 5, Transport::host), Contains("send") && Contains("moves host memory"));
  auto on_host = torch::zeros({2});
  CHECK_THROWS_AS(comm.recv(on_host, next, 5, Transport::device), std::invalid_argument);
  CHECK_THROWS_WITH(comm.recv(on_host, next, 5, Transport::device), Contains("recv") && Contains("moves device memory"));
}

TEST_CASE("host-staged send-only exchange returns at once while its receiver is busy", "[device][mpi]") {
  auto& comm = fixture().comm;
  // 16 MB, beyond MPI's eager limit: the send completes only once rank 1 receives, 1.5 s later. The
  // pipeline's warm-up sends thus; the sender's next forward must not wait for that receive.
  const int64_t elements = 4LL << 20;
  if (comm.rank() == 0) {
    std::vector<PeerMessage> messages{{computed({elements}, 5.0, torch::kFloat32), 1, 21, true}};
    const auto start = std::chrono::steady_clock::now();
    auto sent = comm.exchange(messages, Transport::device);
    CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 0.5);
    sent->wait();
    CHECK(sent->is_completed());
  } else if (comm.rank() == 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    std::vector<PeerMessage> messages{{torch::zeros({elements}, on_device(torch::kFloat32)), 0, 21, false}};
    comm.exchange(messages, Transport::device)->wait();
    CHECK(equals(messages[0].tensor, torch::full({elements}, 5.0F), torch::kFloat32));
  }
  comm.barrier();
}

TEST_CASE("host-staged failure on the communication thread: thrown by its wait and every later call naming it",
          "[device][mpi]") {
  auto& f = fixture();
  HostStagedCommunicator broken(f.world, f.device);  // a failed call breaks its group for good
  setenv("MOEFORGE_TEST_FAIL_COMM", "all_reduce", 1);
  auto work = broken.all_reduce_async(computed({4}, 1.0, torch::kFloat32), ReduceOp::sum);
  unsetenv("MOEFORGE_TEST_FAIL_COMM");
  // (Catch2's combined matchers hold their parts by reference: one matcher, made where it is used.)
  const auto named = Contains("host-staged all_reduce on group world (world ranks [0, 1, 2]) failed: failure injected by "
                              "MOEFORGE_TEST_FAIL_COMM");
  CHECK_THROWS_AS(work->wait(), CommError);
  CHECK_THROWS_WITH(work->wait(), named);
  CHECK(work->is_completed());
  // The next call is refused before it runs, with the error that broke the group.
  CHECK_THROWS_WITH(broken.all_gather(computed({2}, 1.0, torch::kFloat32)), named);
  // A handle nobody waited for does not drop an error either: the next blocking call throws it.
  HostStagedCommunicator unwaited(f.world, f.device);
  setenv("MOEFORGE_TEST_FAIL_COMM", "exchange", 1);
  std::vector<PeerMessage> messages{{computed({3}, 1.0, torch::kFloat32), (f.comm.rank() + 1) % f.comm.size(), 22, true}};
  unwaited.exchange(messages, Transport::device);  // send-only: returns at once, the handle dropped
  unsetenv("MOEFORGE_TEST_FAIL_COMM");
  auto t = computed({4}, 1.0, torch::kFloat32);
  CHECK_THROWS_WITH(unwaited.all_reduce(t, ReduceOp::sum), Contains("host-staged exchange on group world"));
  // Other groups go on.
  auto ok = computed({4}, 1.0, torch::kFloat32);
  f.comm.all_reduce(ok, ReduceOp::sum);
  CHECK(equals(ok, torch::full({4}, static_cast<float>(f.comm.size())), torch::kFloat32));
}

// Last: the calls above are the accesses it judged (their tensors are freed by now too).
TEST_CASE("host-staged calls order every copy: the stream-order checker counted no race", "[device][mpi]") {
  const auto device = fixture().device;
  CHECK(stream_races() == 0);
  // And the checker is on: a write on another stream that did not wait is counted (and reported on
  // stderr, as intended here).
  const long long before = stream_races();
  {
    auto t = computed({4}, 1.0, torch::kFloat32);
    const c10::StreamGuard unordered(c10::impl::getDeviceGuardImpl(device.type())->getStreamFromGlobalPool(device));
    t.add_(1);
  }
  CHECK(stream_races() > before);
}
