// defines: DurableFile, write_file_durably, sync_path, rename_durably, fault_after_rename, kTempInfix, temp_path_for,
//          write_fully
//
// The one way moeforge writes a file that must be complete or absent: the bytes go to a temporary
// `<path>.tmp-<pid>` in the same directory, which is fsynced, closed and renamed over `path`;
// then the directory is fsynced so the rename itself survives a power cut. A crash at any moment
// leaves the old file (or none) and, at worst, a temporary whose name says which process wrote it.
// Every failure is a UserError naming the path, the operation and errno's text.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge {

// Temporaries are `<final name>.tmp-<pid>`: cleanup code can tell its own (and dead processes')
// leftovers from a live writer's.
inline constexpr std::string_view kTempInfix = ".tmp-";
std::filesystem::path temp_path_for(const std::filesystem::path& path);

class DurableFile {
 public:
  explicit DurableFile(std::filesystem::path path);  // creates the temporary
  ~DurableFile();                                     // an uncommitted temporary is removed
  DurableFile(const DurableFile&) = delete;
  DurableFile& operator=(const DurableFile&) = delete;

  void write(const void* data, size_t bytes);  // buffered
  void write(std::string_view text) { write(text.data(), text.size()); }
  // Flush, fsync, close, rename over the final path, fsync the directory.
  void commit();
  const std::filesystem::path& path() const { return path_; }

 private:
  void flush_buffer();
  [[noreturn]] void fail(const char* operation) const;
  std::filesystem::path path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
  std::vector<char> buffer_;
};

// `text` as the whole content of `path`, durably.
void write_file_durably(const std::filesystem::path& path, std::string_view text);

// fsync of a file or a directory (UserError naming it on failure).
void sync_path(const std::filesystem::path& path);

// rename(from, to) followed by an fsync of the target's directory.
void rename_durably(const std::filesystem::path& from, const std::filesystem::path& to);

// Fault injection for the kill tests (docs/reliability.md): with MOEFORGE_FAULT_KILL_AFTER_RENAME
// set to a file name, the process kills itself with SIGKILL right after a durable rename whose
// target has that name (DurableFile::commit, rename_durably), as `kill -9` at that instant would.
inline constexpr const char* kFaultAfterRenameEnv = "MOEFORGE_FAULT_KILL_AFTER_RENAME";
// MOEFORGE_FAULT_SLOW_AFTER_RENAME=NAME:SECONDS sleeps there instead (a slow save).
inline constexpr const char* kFaultSlowAfterRenameEnv = "MOEFORGE_FAULT_SLOW_AFTER_RENAME";
void fault_after_rename(const std::filesystem::path& to);

// Appends `data` to the open file `fd` by as many write(2) calls as it takes (EINTR retried), for
// files that grow record by record (metrics.jsonl, TensorBoard events). Returns data.size(), or the
// bytes written before a failure with errno set (0 when the kernel accepted no bytes).
size_t write_fully(int fd, std::string_view data);

}  // namespace moeforge
