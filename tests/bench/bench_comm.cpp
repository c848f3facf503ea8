// Communication benchmark (run by hand under mpirun; results in docs/parallel.md): per collective
// and message size, the time and the algorithm and bus bandwidth as nccl-tests defines them
// (algbw = bytes / time; busbw = algbw * 2(n-1)/n for all-reduce, (n-1)/n for all-gather,
// reduce-scatter and all-to-all, 1 for broadcast), next to a baseline measured in the same run: a
// local memcpy of the same bytes (what the memory system gives one rank).
//   mpirun --oversubscribe -np 4 build/tests/bench/bench_comm [MAX_MB]
#include "parallel/comm/mpi_communicator.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <vector>

using namespace moeforge;

namespace {
double median_seconds(Communicator& world, int reps, const std::function<void()>& f) {
  std::vector<double> t;
  for (int i = 0; i <= reps; ++i) {
    world.barrier();
    const auto a = std::chrono::steady_clock::now();
    f();
    auto s = torch::full({1}, std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count(), torch::kFloat64);
    world.all_reduce(s, ReduceOp::max);  // a collective ends when its slowest rank does
    if (i > 0) t.push_back(s.item<double>());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  MpiRuntime mpi;
  auto world = MpiCommunicator::world(600.0);
  torch::set_num_threads(1);
  const int n = world->size();
  const int64_t max_mb = argc > 1 ? std::atoll(argv[1]) : 64;
  if (world->rank() == 0) {
    fmt::print("{} ranks; bytes as nccl-tests counts them (all-gather: the output, others: the input); GB/s; memcpy = one rank copying the same bytes\n", n);
    fmt::print("{:>14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}\n", "collective", "bytes", "time (us)", "algbw", "busbw",
               "memcpy", "busbw/memcpy");
  }
  const double nd = n;
  for (int64_t bytes = 1 << 10; bytes <= (max_mb << 20); bytes *= 8) {
    const int64_t floats = bytes / 4;
    auto x = torch::ones({floats});
    auto dst = torch::empty({floats});
    const int reps = bytes >= (8 << 20) ? 5 : 20;
    const double copy = median_seconds(*world, reps, [&] { dst.copy_(x); });
    struct Row {
      const char* name;
      double factor;
      std::function<void()> run;
    };
    const int64_t rows = floats / n * n;
    auto block = torch::ones({rows, 1});
    std::vector<int64_t> even(static_cast<size_t>(n), rows / n);
    const std::vector<Row> table{
        {"all_reduce", 2 * (nd - 1) / nd, [&] { world->all_reduce(x, ReduceOp::sum); }},
        {"all_gather", (nd - 1) / nd, [&] { world->all_gather(x.narrow(0, 0, floats / n)); }},
        {"reduce_scatter", (nd - 1) / nd, [&] { world->reduce_scatter(block, ReduceOp::sum); }},
        {"all_to_all", (nd - 1) / nd, [&] { world->all_to_all(block, even, even); }},
        {"broadcast", 1.0, [&] { world->broadcast(x, 0); }},
    };
    for (const auto& row : table) {
      const double s = median_seconds(*world, reps, row.run);
      // nccl-tests: all-gather's size is the output; the others', the input.
      const double algbw = static_cast<double>(bytes) / s / 1e9;
      if (world->rank() == 0) {
        fmt::print("{:>14} {:>10} {:>10.1f} {:>10.3f} {:>10.3f} {:>10.3f} {:>12.3f}\n", row.name, bytes, s * 1e6, algbw,
                   algbw * row.factor, static_cast<double>(bytes) / copy / 1e9, algbw * row.factor / (static_cast<double>(bytes) / copy / 1e9));
      }
    }
  }
  return 0;
}
