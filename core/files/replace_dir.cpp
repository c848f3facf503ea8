#include "core/files/replace_dir.h"

#include "core/files/dir_lock.h"
#include "core/files/durable_file.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <stdio.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace moeforge {

namespace {

// `<target>.old.tmp-<pid>`: a temporary's name (kTempInfix), so that nothing else takes it for data.
constexpr std::string_view kOldInfix = ".old";

std::string old_copy_name(const fs::path& target) {
  return target.filename().string() + std::string(kOldInfix) + std::string(kTempInfix) + std::to_string(::getpid());
}

}  // namespace

void replace_dir_durably(const fs::path& tmp, const fs::path& target) {
  if (!fs::exists(target)) {
    rename_durably(tmp, target);
    return;
  }
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    sync_path(target.parent_path());
    fs::remove_all(tmp);  // now the old copy
    return;
  }
  const fs::path old = target.parent_path() / old_copy_name(target);
  rename_durably(target, old);
  try {
    rename_durably(tmp, target);
  } catch (...) {
    rename_durably(old, target);
    throw;
  }
  fs::remove_all(old);
}

void recover_replaced_dirs(const fs::path& parent, const std::string& prefix) {
  const std::string infix = std::string(kOldInfix) + std::string(kTempInfix);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(parent, ec)) {
    const std::string name = entry.path().filename().string();
    const auto at = name.rfind(infix);
    if (at == std::string::npos || !name.starts_with(prefix) || !is_abandoned_temporary(name)) continue;
    const fs::path target = parent / name.substr(0, at);
    if (fs::exists(target)) {
      fs::remove_all(entry.path());
    } else {
      rename_durably(entry.path(), target);
      spdlog::warn("restored {} from {} (replacing it was interrupted)", target.string(), entry.path().string());
    }
  }
}

}  // namespace moeforge
