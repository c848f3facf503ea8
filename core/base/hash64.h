// defines: Hash64, hash64
//
// A fast 64-bit hash of a byte stream, for telling files apart (a dataset's index recorded in a
// checkpoint), not for security: four lanes each take every fourth 8-byte word, so their
// multiplies overlap and an index of hundreds of MB hashes at memory speed (512 MiB in 0.08 s on
// the 2-core development machine; FNV-1a, a byte at a time, took 0.76 s). Words are read little-endian, as every host moeforge builds for
// is, so a digest is stable across builds and machines. Fed in pieces or whole, the digest is the
// same.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace moeforge {

class Hash64 {
 public:
  void update(std::span<const std::byte> bytes);
  uint64_t digest() const;

 private:
  static constexpr size_t kBlock = 32;  // four 8-byte words, one per lane
  void block(const std::byte* p);

  std::array<uint64_t, 4> lanes_{0x243F6A8885A308D3ULL, 0x13198A2E03707344ULL, 0xA4093822299F31D0ULL,
                                 0x082EFA98EC4E6C89ULL};  // digits of pi: any distinct values
  std::array<std::byte, kBlock> pending_{};
  size_t pending_size_ = 0;
  uint64_t length_ = 0;
};

inline uint64_t hash64(std::span<const std::byte> bytes) {
  Hash64 h;
  h.update(bytes);
  return h.digest();
}

}  // namespace moeforge
