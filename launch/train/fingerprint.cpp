#include "launch/train/fingerprint.h"

#include <stdexcept>

#include <elf.h>
#include <fmt/format.h>
#include <link.h>
#include <openssl/evp.h>

#include <array>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>

extern char** environ;

// The commit the binary was configured from (CMake embeds it at configure time; "unknown" outside
// a git checkout).
#ifndef MOEFORGE_BUILD_GIT_COMMIT
#define MOEFORGE_BUILD_GIT_COMMIT "unknown"
#endif
#ifndef MOEFORGE_BUILD_GIT_DIRTY
#define MOEFORGE_BUILD_GIT_DIRTY -1
#endif

namespace moeforge {

namespace {

// Walks the main program's PT_NOTE segments (dl_iterate_phdr reports it first) for NT_GNU_BUILD_ID.
int find_build_id(dl_phdr_info* info, size_t, void* out) {
  auto& id = *static_cast<std::string*>(out);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_NOTE) continue;
    const auto* p = reinterpret_cast<const unsigned char*>(info->dlpi_addr + ph.p_vaddr);
    const auto* end = p + ph.p_memsz;
    // Each note: namesz, descsz, type, then the name and the descriptor, each padded to 4 bytes.
    while (p + sizeof(ElfW(Nhdr)) <= end) {
      ElfW(Nhdr) note;
      std::memcpy(&note, p, sizeof note);
      const auto* name = p + sizeof note;
      const auto* desc = name + ((note.n_namesz + 3) & ~3u);
      if (note.n_type == NT_GNU_BUILD_ID && note.n_namesz == 4 && std::memcmp(name, "GNU", 4) == 0) {
        for (ElfW(Word) k = 0; k < note.n_descsz; ++k) id += fmt::format("{:02x}", desc[k]);
        return 1;
      }
      p = desc + ((note.n_descsz + 3) & ~3u);
    }
  }
  return 1;  // only the first object, the program itself
}

}  // namespace

std::string sha256_hex(std::string_view bytes) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest.data(), &length, EVP_sha256(), nullptr) != 1) {
    throw std::runtime_error("OpenSSL EVP_Digest(SHA-256) failed");
  }
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

std::string elf_build_id() {
  std::string id;
  dl_iterate_phdr(find_build_id, &id);
  return id;
}

nlohmann::json fingerprint_environment_variables() {
  std::map<std::string, std::string> found;  // sorted, so two fingerprints diff line by line
  for (char** e = environ; e && *e; ++e) {
    const std::string entry = *e;
    const auto eq = entry.find('=');
    if (eq == std::string::npos) continue;
    const std::string name = entry.substr(0, eq);
    if (name.rfind("NCCL_", 0) == 0 || name.rfind("CUDA_", 0) == 0 || name.rfind("MOEFORGE_", 0) == 0 ||
        name == "OMP_NUM_THREADS") {
      found[name] = entry.substr(eq + 1);
    }
  }
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [k, v] : found) out[k] = v;
  return out;
}

void add_build_fingerprint(nlohmann::json& env, const std::filesystem::path& resolved_config) {
  std::ifstream in(resolved_config, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  env["config_sha256"] = sha256_hex(bytes);
  const std::string id = elf_build_id();
  env["build_id"] = id.empty() ? nlohmann::json(nullptr) : nlohmann::json(id);
  env["build_git_commit"] = MOEFORGE_BUILD_GIT_COMMIT;
  const int dirty = MOEFORGE_BUILD_GIT_DIRTY;
  env["build_git_dirty"] = dirty < 0 ? nlohmann::json(nullptr) : nlohmann::json(dirty == 1);
  env["environment_variables"] = fingerprint_environment_variables();
}

}  // namespace moeforge
