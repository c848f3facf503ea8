// defines: SafetensorsDType, kSafetensorsDTypes, SafetensorsHeader, parse_safetensors_header,
//          safetensors_dtype_names, shorten_for_message, show_json
//
// The safetensors header, parsed and validated without LibTorch (so that a fuzzer builds it with
// clang alone, tests/fuzz/): the 8-byte length, the JSON (no duplicate names, metadata of
// strings), every tensor's dtype, shape and data offsets, and the tensors tiling the data section
// exactly. core/files/safetensors.h maps and reads the files; this is only the header's validation.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace moeforge {

struct SafetensorsDType {
  std::string_view name;
  size_t bytes;
};

// In the order of the safetensors crate's `Dtype` enum: its writer lays tensors out by this order,
// last first, then by name, and following it makes our files byte-identical to Python's. (That
// order puts wider types first, so every tensor's data is aligned to its element size.)
inline constexpr std::array<SafetensorsDType, 19> kSafetensorsDTypes = {{
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1}, {"F8_E4M3FNUZ", 1},
    {"F8_E5M2FNUZ", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2}, {"BF16", 2}, {"I32", 4}, {"U32", 4},
    {"F32", 4}, {"C64", 8}, {"F64", 8}, {"I64", 8}, {"U64", 8},
}};

struct SafetensorsHeader {
  struct Entry {
    std::string dtype;      // as in the file: "BF16"
    size_t dtype_index = 0;  // into kSafetensorsDTypes
    std::vector<int64_t> shape;
    size_t begin = 0, end = 0;  // byte range in the data section
  };
  uint64_t data_offset = 0;        // where the data section starts: 8 + the header's length
  std::vector<std::string> names;  // in data-offset order
  std::unordered_map<std::string, Entry> entries;
  std::map<std::string, std::string> metadata;  // "__metadata__"
};

// The header of the `size` bytes of a whole file at `file`; UserError naming `path`, the tensor
// and the fix for anything malformed.
SafetensorsHeader parse_safetensors_header(const std::byte* file, size_t size, const std::string& path);

// "BOOL, U8, ...": the dtype names, for messages.
std::string safetensors_dtype_names();

// Text for an error message, cut to 80 characters.
std::string shorten_for_message(std::string text);
// A JSON value as text for an error message, cut the same way.
std::string show_json(const nlohmann::json& value);

}  // namespace moeforge
