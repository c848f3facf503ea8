// defines: NpyArray, write_npy, read_npy
//
// Minimal .npy (format 1.0) reading and writing for the index cache, so cached indices can be
// opened with numpy.load and compared with Megatron's own cache files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::data {

struct NpyArray {
  std::string descr;           // "<i4", "<i8", "<u4", ...
  std::vector<int64_t> shape;  // C order
  std::vector<std::byte> data;
};

// Writes atomically (temporary name, then rename).
void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data, size_t bytes);
NpyArray read_npy(const std::string& path);

}  // namespace moeforge::data
