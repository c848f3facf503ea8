#include "core/files/durable_file.h"

#include "core/base/errors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace fs = std::filesystem;

namespace moeforge {

namespace {

constexpr size_t kBufferBytes = 1 << 20;  // many small writes (dataset documents) become few syscalls

fs::path directory_of(const fs::path& path) { return path.parent_path().empty() ? fs::path(".") : path.parent_path(); }

}  // namespace

fs::path temp_path_for(const fs::path& path) {
  return fs::path(path.string() + std::string(kTempInfix) + std::to_string(::getpid()));
}

DurableFile::DurableFile(fs::path path) : path_(std::move(path)), tmp_(temp_path_for(path_)) {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    fail_user("cannot create {}: {}. Check that {} exists and is writable.", tmp_.string(), std::strerror(errno),
              directory_of(path_).string());
  }
  buffer_.reserve(kBufferBytes);
}

DurableFile::~DurableFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void DurableFile::write(const void* data, size_t bytes) {
  const auto* p = static_cast<const char*>(data);
  if (buffer_.size() + bytes <= kBufferBytes) {
    buffer_.insert(buffer_.end(), p, p + bytes);
    return;
  }
  flush_buffer();
  while (bytes > 0) {
    const ssize_t k = ::write(fd_, p, bytes);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) fail("write");
    p += k;
    bytes -= static_cast<size_t>(k);
  }
}

void DurableFile::flush_buffer() {
  size_t at = 0;
  while (at < buffer_.size()) {
    const ssize_t k = ::write(fd_, buffer_.data() + at, buffer_.size() - at);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) fail("write");
    at += static_cast<size_t>(k);
  }
  buffer_.clear();
}

void DurableFile::commit() {
  flush_buffer();
  if (::fsync(fd_) != 0) fail("fsync");
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) fail("close");
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail("rename");
  fault_after_rename(path_);
  committed_ = true;
  sync_path(directory_of(path_));
}

void DurableFile::fail(const char* operation) const {
  fail_user("cannot write {}: {} of {} failed: {}. Free disk space or choose another output path.", path_.string(),
            operation, tmp_.string(), std::strerror(errno));
}

void write_file_durably(const fs::path& path, std::string_view text) {
  DurableFile out(path);
  out.write(text);
  out.commit();
}

void sync_path(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_user("cannot open {} to sync it: {}", path.string(), std::strerror(errno));
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  // Some file systems refuse fsync on directories (EINVAL): nothing more can be done there.
  if (rc != 0 && !(saved == EINVAL && fs::is_directory(path))) {
    fail_user("fsync of {} failed: {}. Check the disk and free space.", path.string(), std::strerror(saved));
  }
}

void fault_after_rename(const fs::path& to) {
  // Read each time: tests set it per process, and a rename is rare enough.
  const char* name = std::getenv(kFaultAfterRenameEnv);
  if (name && *name && to.filename() == name) ::raise(SIGKILL);
  // NAME:SECONDS, a slow disk or file system at that instant.
  const char* slow = std::getenv(kFaultSlowAfterRenameEnv);
  const char* colon = slow ? std::strchr(slow, ':') : nullptr;
  if (colon && to.filename() == std::string(slow, colon)) ::sleep(static_cast<unsigned>(std::atoi(colon + 1)));
}

void rename_durably(const fs::path& from, const fs::path& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    fail_user("cannot rename {} to {}: {}", from.string(), to.string(), std::strerror(errno));
  }
  fault_after_rename(to);
  sync_path(directory_of(to));
}

size_t write_fully(int fd, std::string_view data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = 0;
      return done;
    }
    done += static_cast<size_t>(n);
  }
  return done;
}

}  // namespace moeforge
