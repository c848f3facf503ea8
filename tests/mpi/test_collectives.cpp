// Every collective of MpiCommunicator against closed forms (rank r of n contributes values made
// from r, so each result is a formula of n), fp32, int64 and bf16, chunked and not, uneven
// all-to-all and sub-groups. Run by ctest under `mpirun --oversubscribe -np 4` (and -np 3).
#include "parallel/comm/mpi_communicator.h"

#include <catch2/catch.hpp>

using namespace moeforge;

namespace {
MpiCommunicator& world() {
  static auto w = MpiCommunicator::world(60.0);
  return *w;
}
}  // namespace

TEST_CASE("all_reduce: sum, avg and max in fp32, int64 and bf16, chunked and whole", "[mpi]") {
  auto& w = world();
  const int n = w.size(), r = w.rank();
  auto t = torch::full({5}, static_cast<float>(r + 1));
  w.all_reduce(t, ReduceOp::sum);
  CHECK(torch::equal(t, torch::full({5}, n * (n + 1) / 2.0F)));
  t = torch::full({5}, static_cast<float>(r + 1));
  w.all_reduce(t, ReduceOp::avg);
  CHECK(torch::allclose(t, torch::full({5}, (n + 1) / 2.0F)));
  t = torch::full({5}, static_cast<float>(r + 1));
  w.all_reduce(t, ReduceOp::max);
  CHECK(torch::equal(t, torch::full({5}, static_cast<float>(n))));
  auto i = torch::full({3}, static_cast<int64_t>(r) << 40, torch::kInt64);  // beyond 32 bits
  w.all_reduce(i, ReduceOp::sum);
  CHECK(torch::equal(i, torch::full({3}, (static_cast<int64_t>(n) * (n - 1) / 2) << 40, torch::kInt64)));
  auto b = torch::full({4}, r + 0.5, torch::kBFloat16);
  w.all_reduce(b, ReduceOp::sum);
  CHECK(b.scalar_type() == torch::kBFloat16);
  CHECK(torch::equal(b.to(torch::kFloat32), torch::full({4}, n * n / 2.0F)));
  w.set_max_chunk_elements(3);
  auto c = torch::arange(10, torch::kFloat32) + 100.0F * static_cast<float>(r);
  w.all_reduce(c, ReduceOp::sum);
  w.set_max_chunk_elements(INT_MAX);
  CHECK(torch::equal(c, torch::arange(10, torch::kFloat32) * static_cast<float>(n) + 100.0F * n * (n - 1) / 2.0F));
}

TEST_CASE("asynchronous all_reduce: several in flight, blocking calls between them, errors rethrown by wait", "[mpi][work]") {
  auto& w = world();
  const int n = w.size(), r = w.rank();
  std::vector<torch::Tensor> tensors;
  std::vector<std::shared_ptr<Work>> work;
  w.set_max_chunk_elements(1000);  // tensors 2.. are sent in parts
  for (int k = 0; k < 6; ++k) {
    // Sizes from small to chunked, and bf16 (reduced in fp32 on the communication thread).
    tensors.push_back(torch::full({1 + k * 1000}, static_cast<float>(r + k), k == 5 ? torch::kBFloat16 : torch::kFloat32));
    work.push_back(w.all_reduce_async(tensors.back(), k % 2 ? ReduceOp::sum : ReduceOp::max));
    // A blocking collective on the same group while those are in flight.
    auto blocking = torch::full({2}, static_cast<float>(r));
    w.all_reduce(blocking, ReduceOp::sum);
    CHECK(torch::equal(blocking, torch::full({2}, n * (n - 1) / 2.0F)));
  }
  for (int k = 0; k < 6; ++k) {
    work[static_cast<size_t>(k)]->wait();
    CHECK(work[static_cast<size_t>(k)]->is_completed());
    const float expected = k % 2 ? static_cast<float>(n * (n - 1) / 2 + n * k) : static_cast<float>(n - 1 + k);
    INFO("tensor " << k);
    CHECK(torch::equal(tensors[static_cast<size_t>(k)].to(torch::kFloat32), torch::full({1 + k * 1000}, expected)));
  }
  w.set_max_chunk_elements(INT_MAX);
  // Every rank makes the same mistake, so no rank waits for another: each wait() rethrows it.
  auto failing = w.all_reduce_async(torch::ones({2}, torch::kInt64), ReduceOp::avg);
  CHECK_THROWS_WITH(failing->wait(), Catch::Matchers::Contains("avg of integers"));
  CHECK_THROWS(w.all_reduce_async(torch::ones({4, 2}).t(), ReduceOp::sum));  // not contiguous: refused at once
}

TEST_CASE("all_gather and reduce_scatter, blocking and asynchronous", "[mpi]") {
  auto& w = world();
  const int n = w.size(), r = w.rank();
  const auto g = w.all_gather(torch::full({2, 3}, static_cast<float>(r)));
  REQUIRE(g.sizes() == c10::IntArrayRef({2 * n, 3}));
  for (int p = 0; p < n; ++p) CHECK(torch::equal(g.narrow(0, 2 * p, 2), torch::full({2, 3}, static_cast<float>(p))));
  const auto bf = w.all_gather(torch::full({1}, r, torch::kBFloat16));
  CHECK(torch::equal(bf.to(torch::kFloat32), torch::arange(n, torch::kFloat32)));
  const auto s = w.reduce_scatter(torch::arange(2 * n, torch::kFloat32).view({2 * n, 1}) + static_cast<float>(r), ReduceOp::sum);
  REQUIRE(s.sizes() == c10::IntArrayRef({2, 1}));
  const auto expected = torch::arange(2 * r, 2 * r + 2, torch::kFloat32).view({2, 1}) * static_cast<float>(n) + n * (n - 1) / 2.0F;
  CHECK(torch::equal(s, expected));
  // bf16 through fp32, and the chunked path.
  const auto sb = w.reduce_scatter((torch::arange(2 * n, torch::kFloat32).view({2 * n, 1}) + static_cast<float>(r)).to(torch::kBFloat16),
                                   ReduceOp::sum);
  CHECK(torch::equal(sb.to(torch::kFloat32), expected));
  w.set_max_chunk_elements(1);
  CHECK(torch::equal(w.reduce_scatter(torch::arange(2 * n, torch::kFloat32).view({2 * n, 1}) + static_cast<float>(r), ReduceOp::sum),
                     expected));
  w.set_max_chunk_elements(INT_MAX);
  // Asynchronous, both in flight with a blocking call between start and wait (ZeRO-1's buckets).
  torch::Tensor scattered, gathered;
  auto rs = w.reduce_scatter_async(torch::arange(2 * n, torch::kFloat32).view({2 * n, 1}) + static_cast<float>(r), scattered,
                                   ReduceOp::sum);
  auto ag = w.all_gather_async(torch::full({2, 3}, static_cast<float>(r)), gathered);
  auto between = torch::ones({1});
  w.all_reduce(between, ReduceOp::sum);
  rs->wait();
  ag->wait();
  CHECK(torch::equal(scattered, expected));
  REQUIRE(gathered.sizes() == c10::IntArrayRef({2 * n, 3}));
  for (int p = 0; p < n; ++p) CHECK(torch::equal(gathered.narrow(0, 2 * p, 2), torch::full({2, 3}, static_cast<float>(p))));
  CHECK_THROWS(w.reduce_scatter_async(torch::ones({2 * n + 1}), scattered, ReduceOp::sum));  // refused at once
}

TEST_CASE("all_to_all from a rank that sends no rows at all to ranks that do", "[mpi]") {
  // Rank 0 sends nothing (a [0, 3] tensor: the MoE dispatcher's combine when none of its experts was
  // chosen) and receives two rows from every other rank; its row size must still be 3 elements.
  auto& w = world();
  const int n = w.size(), r = w.rank();
  std::vector<int64_t> send_rows(static_cast<size_t>(n), 0), recv_rows(static_cast<size_t>(n), 0);
  if (r != 0) send_rows[0] = 2;
  if (r == 0) {
    for (int p = 1; p < n; ++p) recv_rows[static_cast<size_t>(p)] = 2;
  }
  const auto in = torch::full({r == 0 ? 0 : 2, 3}, static_cast<float>(r));
  const auto out = w.all_to_all(in, send_rows, recv_rows);
  if (r == 0) {
    REQUIRE(out.sizes() == c10::IntArrayRef({2 * (n - 1), 3}));
    for (int p = 1; p < n; ++p) CHECK(out[2 * (p - 1) + 1][2].item<float>() == static_cast<float>(p));
  } else {
    CHECK(out.size(0) == 0);
  }
}

TEST_CASE("uneven all_to_all delivers each block to its rank, in rank order", "[mpi]") {
  auto& w = world();
  const int n = w.size(), r = w.rank();
  // Rank r sends (r + p) % 3 rows to rank p (possibly none); row j of that block is 1000 r + 10 p + j.
  std::vector<int64_t> send_rows, recv_rows;
  std::vector<torch::Tensor> blocks;
  for (int p = 0; p < n; ++p) {
    const int64_t k = (r + p) % 3;
    send_rows.push_back(k);
    recv_rows.push_back((p + r) % 3);
    blocks.push_back((torch::arange(k, torch::kFloat32) + 1000.0F * static_cast<float>(r) + 10.0F * static_cast<float>(p))
                         .view({k, 1})
                         .expand({k, 4})
                         .contiguous());
  }
  // Blocking, and asynchronous on the communication thread with a blocking collective between
  // start and wait.
  for (const bool async : {false, true}) {
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      INFO((async ? "all_to_all_async " : "all_to_all ") << dtype);
      torch::Tensor out;
      if (async) {
        auto work = w.all_to_all_async(torch::cat(blocks).to(dtype), out, send_rows, recv_rows);
        auto between = torch::ones({3});
        w.all_reduce(between, ReduceOp::sum);
        work->wait();
        CHECK(work->is_completed());
      } else {
        out = w.all_to_all(torch::cat(blocks).to(dtype), send_rows, recv_rows);
      }
      int64_t at = 0;
      for (int p = 0; p < n; ++p) {
        const int64_t k = recv_rows[static_cast<size_t>(p)];
        const auto expected = (torch::arange(k, torch::kFloat32) + 1000.0F * static_cast<float>(p) + 10.0F * static_cast<float>(r))
                                  .view({k, 1})
                                  .expand({k, 4})
                                  .to(dtype);
        CHECK(torch::equal(out.narrow(0, at, k), expected));
        at += k;
      }
      CHECK(at == out.size(0));
    }
  }
  torch::Tensor out;
  CHECK_THROWS_WITH(w.all_to_all_async(torch::ones({1, 4}), out, send_rows, recv_rows),  // refused at once
                    Catch::Matchers::Contains("send counts sum to"));
}

TEST_CASE("broadcast, send/recv and barrier", "[mpi]") {
  auto& w = world();
  const int n = w.size(), r = w.rank();
  const int root = n - 1;
  for (int64_t chunk : {int64_t{INT_MAX}, int64_t{7}}) {
    w.set_max_chunk_elements(chunk);
    auto t = r == root ? torch::arange(50, torch::kFloat32) : torch::zeros({50});
    w.broadcast(t, root);
    CHECK(torch::equal(t, torch::arange(50, torch::kFloat32)));
    // A ring: even ranks send first, odd ranks receive first, so blocking sends cannot deadlock.
    const auto mine = torch::full({33}, static_cast<double>(r), torch::kFloat64);
    auto theirs = torch::empty({33}, torch::kFloat64);
    const int next = (r + 1) % n, prev = (r + n - 1) % n;
    if (r % 2 == 0) {
      w.send(mine, next, 5, Transport::host);
      w.recv(theirs, prev, 5, Transport::host);
    } else {
      w.recv(theirs, prev, 5, Transport::host);
      w.send(mine, next, 5, Transport::host);
    }
    CHECK(torch::equal(theirs, torch::full({33}, static_cast<double>(prev), torch::kFloat64)));
  }
  w.set_max_chunk_elements(INT_MAX);
  w.barrier();
}

TEST_CASE("asynchronous sends: several posted to a neighbour before it receives, in order, the buffer kept by the handle",
          "[mpi][work]") {
  // A ring where every rank posts all its sends before receiving anything (blocking sends would
  // deadlock beyond MPI's eager size: 256K elements are 1 MB), then a paired send_recv on top.
  auto& w = world();
  const int n = w.size(), r = w.rank();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  std::vector<std::shared_ptr<Work>> sends;
  for (int k = 0; k < 3; ++k) sends.push_back(w.send_async(torch::full({1 << 18}, static_cast<float>(10 * r + k)), next, 5, Transport::host));
  auto mine = torch::full({4}, static_cast<float>(r));
  auto theirs = torch::empty({4});
  w.send_recv(mine, next, theirs, prev, 6, Transport::host);
  CHECK(torch::equal(theirs, torch::full({4}, static_cast<float>(prev))));
  for (int k = 0; k < 3; ++k) {
    auto in = torch::empty({1 << 18});
    w.recv(in, prev, 5, Transport::host);
    CHECK(torch::equal(in, torch::full({1 << 18}, static_cast<float>(10 * prev + k))));
  }
  for (auto& s : sends) {
    s->wait();
    CHECK(s->is_completed());
  }
  CHECK_THROWS(w.send_async(torch::ones({4}), next, 5, Transport::device));  // the transport is checked at once
  w.barrier();
}

TEST_CASE("sub-groups by split and by member list", "[mpi]") {
  auto& w = world();
  const int r = w.rank();
  const auto parity = w.split(r % 2, r, "parity");
  auto t = torch::full({1}, static_cast<int64_t>(r), torch::kInt64);
  parity->all_reduce(t, ReduceOp::sum);
  int64_t expected = 0;
  std::vector<int64_t> members;
  for (int p = r % 2; p < w.size(); p += 2) {
    expected += p;
    members.push_back(p);
  }
  CHECK(t.item<int64_t>() == expected);
  CHECK(parity->world_ranks() == std::vector<int>(members.begin(), members.end()));
  const auto same = w.group_of(members, "parity2");
  CHECK(same->size() == static_cast<int>(members.size()));
  CHECK(same->world_ranks() == parity->world_ranks());
}
