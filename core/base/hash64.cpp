#include "core/base/hash64.h"

#include <algorithm>
#include <bit>
#include <cstring>

namespace moeforge {

namespace {

constexpr uint64_t kWordMul = 0x9E3779B97F4A7C15ULL, kLaneMul = 0xC2B2AE3D27D4EB4FULL;

uint64_t word_at(const std::byte* p) {
  uint64_t w = 0;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// splitmix64's finalizer: every input bit reaches every output bit.
uint64_t mix(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

}  // namespace

void Hash64::block(const std::byte* p) {
  // Multiply, rotate, multiply: a lane's value depends on its words and their order.
  for (size_t i = 0; i < lanes_.size(); ++i) lanes_[i] = std::rotl(lanes_[i] ^ (word_at(p + 8 * i) * kWordMul), 29) * kLaneMul;
}

void Hash64::update(std::span<const std::byte> bytes) {
  length_ += bytes.size();
  const std::byte* p = bytes.data();
  size_t n = bytes.size();
  if (pending_size_ > 0) {  // complete the block an earlier piece began
    const size_t take = std::min(n, kBlock - pending_size_);
    if (take > 0) std::memcpy(pending_.data() + pending_size_, p, take);
    pending_size_ += take;
    p += take;
    n -= take;
    if (pending_size_ < kBlock) return;
    block(pending_.data());
    pending_size_ = 0;
  }
  for (; n >= kBlock; p += kBlock, n -= kBlock) block(p);
  if (n > 0) std::memcpy(pending_.data(), p, n);
  pending_size_ = n;
}

uint64_t Hash64::digest() const {
  // The last bytes zero-padded into a block; the length, folded in, tells the padding from data.
  Hash64 last = *this;
  if (pending_size_ > 0) {
    std::fill(last.pending_.begin() + static_cast<std::ptrdiff_t>(pending_size_), last.pending_.end(), std::byte{0});
    last.block(last.pending_.data());
  }
  uint64_t h = mix(length_ + kWordMul);
  for (const uint64_t lane : last.lanes_) h = mix(h ^ lane);
  return h;
}

}  // namespace moeforge
