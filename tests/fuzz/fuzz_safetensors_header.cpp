// libFuzzer target for the safetensors header parser (core/files/safetensors_header.cpp). Input: a whole
// file's bytes. Parsing must either return a header whose tensors tile the data section, or throw
// UserError; anything else (a crash, a sanitizer report, another exception type) is a bug.
#include "core/base/errors.h"
#include "core/files/safetensors_header.h"

#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto h = moeforge::parse_safetensors_header(reinterpret_cast<const std::byte*>(data), size, "fuzz.safetensors");
    size_t covered = 0;
    for (const auto& name : h.names) {
      const auto& e = h.entries.at(name);
      if (e.begin != covered || e.end < e.begin || e.dtype_index >= moeforge::kSafetensorsDTypes.size()) std::abort();
      covered = e.end;
    }
    if (h.data_offset + covered != size) std::abort();  // accepted, so it must tile the data exactly
  } catch (const moeforge::UserError&) {
  }
  return 0;
}
