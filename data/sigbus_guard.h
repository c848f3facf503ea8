// defines: guard_mapping, unguard_mapping
//
// A memory-mapped file that shrinks under a running job (truncated, rewritten, its storage lost)
// turns the next read of the missing pages into SIGBUS, which would end the process without a
// word. The mappings of dataset files are registered here; a SIGBUS inside one of them prints
// which file failed and what to do, and exits 1. A SIGBUS anywhere else keeps its default action.
#pragma once

#include <cstddef>
#include <string>

namespace moeforge::data {

void guard_mapping(const void* begin, size_t size, const std::string& path);
void unguard_mapping(const void* begin);

}  // namespace moeforge::data
