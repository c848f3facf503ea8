// defines: NumpyRandomState, numpy_sum
//
// Bit-exact re-implementations of the numpy routines Megatron's index building depends on, so
// that our sample order equals Megatron's for the same seed.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

namespace moeforge::data {

// numpy.random.RandomState(seed): MT19937 seeded with the classic Knuth initialisation, which is
// exactly std::mt19937(seed). Only what Megatron calls is provided.
class NumpyRandomState {
 public:
  explicit NumpyRandomState(uint32_t seed) : mt_(seed) {}

  // RandomState.random_interval (legacy): uniform in [0, max] by masked rejection sampling.
  uint64_t random_interval(uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    for (int shift = 1; shift <= 32; shift *= 2) mask |= mask >> shift;
    uint64_t value = 0;
    if (max <= 0xffffffffULL) {
      while ((value = (next32() & mask)) > max) {
      }
    } else {
      while ((value = (next64() & mask)) > max) {
      }
    }
    return value;
  }

  // RandomState.shuffle of a 1-D array: Fisher-Yates from the end. The swap partners depend only
  // on the position, not on the contents, so they are drawn a block ahead and the random
  // accesses prefetched: the same result, without waiting on a cache miss per element.
  template <typename T>
  void shuffle(std::span<T> x) {
    constexpr size_t kBlock = 8192;
    constexpr size_t kAhead = 32;
    std::vector<size_t> partner(std::min(kBlock, x.size()));
    for (size_t top = x.size(); top > 1;) {
      const size_t count = std::min(kBlock, top - 1);  // positions top-1 down to top-count
      for (size_t k = 0; k < count; ++k) partner[k] = static_cast<size_t>(random_interval(top - 1 - k));
      for (size_t k = 0; k < count; ++k) {
        if (k + kAhead < count) __builtin_prefetch(&x[partner[k + kAhead]], 1);
        std::swap(x[top - 1 - k], x[partner[k]]);
      }
      top -= count;
    }
  }

 private:
  uint64_t next32() { return mt_(); }
  uint64_t next64() {
    const uint64_t hi = next32();
    return (hi << 32) | next32();
  }
  std::mt19937 mt_;
};

// numpy.sum of a contiguous float64 array: pairwise summation with 8-way unrolled blocks of up to
// 128, which rounds differently from a plain loop for more than 7 elements.
double numpy_sum(std::span<const double> values);

}  // namespace moeforge::data
