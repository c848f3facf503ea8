// libFuzzer target for the .idx parser (data/indexed_dataset.cpp). Input: 2 bytes giving the
// .bin size, then the .idx bytes. Opening must either succeed, after which every sequence is
// readable, or throw UserError; anything else (a crash, a sanitizer report) is a bug.
#include "core/base/errors.h"
#include "data/indexed_dataset.h"

#include <cstdio>
#include <string>
#include <unistd.h>
#include <vector>

namespace {
const std::string& prefix() {
  static const std::string p = "/dev/shm/moeforge-fuzz-" + std::to_string(::getpid());
  return p;
}
void write(const std::string& path, const uint8_t* data, size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (size) std::fwrite(data, 1, size, f);
  std::fclose(f);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const size_t bin_size = (static_cast<size_t>(data[0]) | static_cast<size_t>(data[1]) << 8) % 4096;
  const std::vector<uint8_t> bin(bin_size, 7);
  write(moeforge::data::bin_path(prefix()), bin.data(), bin.size());
  write(moeforge::data::idx_path(prefix()), data + 2, size - 2);
  try {
    const moeforge::data::IndexedDataset d(prefix());
    std::vector<int64_t> out;
    for (int64_t i = 0; i < d.num_sequences(); ++i) {
      out.resize(static_cast<size_t>(d.sequence_lengths()[static_cast<size_t>(i)]));
      d.read(i, 0, static_cast<int64_t>(out.size()), out.data());
    }
    d.token_id_range();
  } catch (const moeforge::UserError&) {
  }
  return 0;
}
