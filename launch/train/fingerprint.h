// defines: sha256_hex, elf_build_id, fingerprint_environment_variables, add_build_fingerprint
//
// What makes two benchmark rows comparable, beyond the machine: the exact resolved config (its
// SHA-256, OpenSSL's), the binary that ran (its ELF build-id, which the linker writes, with the
// git commit and dirty flag of the build: hashing a 250 MB binary at every start is not worth
// it), and the environment variables that change communication or kernels (NCCL_*, CUDA_*,
// OMP_NUM_THREADS, MOEFORGE_*). Keys in docs/report.md.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <string_view>

namespace moeforge {

// Lower-case hex SHA-256 of `bytes` (OpenSSL EVP).
std::string sha256_hex(std::string_view bytes);

// The running executable's GNU build-id (its .note.gnu.build-id) as lower-case hex, read from the
// loaded program headers; empty when the binary has none.
std::string elf_build_id();

// NCCL_*, CUDA_*, OMP_NUM_THREADS and MOEFORGE_* of this process, by name.
nlohmann::json fingerprint_environment_variables();

// Adds config_sha256 (of the resolved config file's bytes), build_id, build_git_commit,
// build_git_dirty and environment_variables to an environment.json object.
void add_build_fingerprint(nlohmann::json& environment, const std::filesystem::path& resolved_config);

}  // namespace moeforge
