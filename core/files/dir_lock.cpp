#include "core/files/dir_lock.h"

#include "core/files/replace_dir.h"

#include "core/files/durable_file.h"
#include "core/base/errors.h"
#include "core/files/file_names.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <optional>
#include <fcntl.h>
#include <fstream>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moeforge {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string launcher_job_id() {
  for (const char* var : {"SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"}) {
    if (const char* v = std::getenv(var); v && *v) return v;
  }
  return "none";
}

// Slurm's count of this job's requeues (absent before the first): -1 outside a Slurm job.
int64_t slurm_restart_count() {
  const char* job = std::getenv("SLURM_JOB_ID");
  if (!job || !*job) return -1;
  const char* count = std::getenv("SLURM_RESTART_COUNT");
  return count && *count ? std::strtoll(count, nullptr, 10) : 0;
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string read_all(int fd) {
  std::string out;
  char buf[512];
  off_t at = 0;
  for (ssize_t n; (n = ::pread(fd, buf, sizeof(buf), at)) > 0; at += n) out.append(buf, static_cast<size_t>(n));
  return out;
}

std::optional<ProcessOwner> parse_owner(const std::string& text) {
  const auto j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("host") || !j["host"].is_string() || !j.contains("pid") ||
      !j["pid"].is_number_integer()) {
    return std::nullopt;
  }
  return ProcessOwner{j["host"].get<std::string>(), j["pid"].get<int64_t>(), j.value("job", std::string("none")),
                      j.value("started", std::string("?")), j.value("restart", int64_t{-1})};
}

std::string owner_text(const std::string& record) {
  const auto owner = parse_owner(record);
  return owner ? owner->describe() : fmt::format("an unreadable owner record '{}'", record);
}

bool same_file(int fd, const fs::path& path) {
  struct stat a{}, b{};
  return ::fstat(fd, &a) == 0 && ::stat(path.c_str(), &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

}  // namespace

std::string this_host() {
  char buf[256] = {};
  ::gethostname(buf, sizeof(buf) - 1);
  return buf;
}

ProcessOwner ProcessOwner::self() {
  return {this_host(), ::getpid(), launcher_job_id(), utc_now(), slurm_restart_count()};
}

std::string ProcessOwner::describe() const {
  const std::string run = restart >= 0 ? fmt::format(", Slurm restart {}", restart) : "";
  return fmt::format("pid {} on host {} (job {}{}, started {})", pid, host, job, run, started);
}

bool ProcessOwner::earlier_run_of(const ProcessOwner& me) const {
  // Slurm requeues a job only once every process of its previous run has ended, and counts the
  // runs: the same job id with a lower count is a run that can hold nothing any more.
  return me.restart >= 0 && restart >= 0 && job == me.job && job != "none" && restart < me.restart;
}

bool ProcessOwner::gone() const {
  if (host != this_host() || pid <= 0) return false;
  if (::kill(static_cast<pid_t>(pid), 0) != 0) return errno == ESRCH;
  // A killed process stays a zombie until its parent (or init) reaps it: it holds nothing.
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string line;
  std::getline(stat, line);
  const auto close = line.rfind(')');  // "pid (comm) S ...": comm may hold spaces and parentheses
  return close != std::string::npos && close + 2 < line.size() && (line[close + 2] == 'Z' || line[close + 2] == 'X');
}

DirectoryLock::DirectoryLock(fs::path path, int fd, std::string record)
    : path_(std::move(path)), fd_(fd), record_(std::move(record)) {}

DirectoryLock::~DirectoryLock() {
  // Unlinked only while it is still ours: the flock is held until close.
  if (same_file(fd_, path_) && read_all(fd_) == record_) ::unlink(path_.c_str());
  ::close(fd_);
}

namespace {

[[noreturn]] void refuse_in_use(std::string_view key, const fs::path& dir, const std::string& owner, const fs::path& path) {
  fail_user("{} {} is in use by another run: {} holds {}. Wait for that run to end, or give this run another {}.", key,
            dir.string(), owner, path.string(), key);
}

[[noreturn]] void refuse_other_host(std::string_view key, const fs::path& dir, const ProcessOwner& owner, const fs::path& path) {
  fail_user("{} {} is locked by {}: a run on another host, which this host cannot check. If that run has ended, "
            "delete {}; otherwise give this run another {}.",
            key, dir.string(), owner.describe(), path.string(), key);
}

// A record from another host that this process may take over: an earlier run of its Slurm job.
bool earlier_run_of_this_job(const std::optional<ProcessOwner>& owner) {
  return owner && owner->host != this_host() && owner->earlier_run_of(ProcessOwner::self());
}

}  // namespace

std::unique_ptr<DirectoryLock> DirectoryLock::acquire(const fs::path& dir, std::string_view key) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  const fs::path path = dir / files::kDirectoryLock;
  auto fail_io = [&](const char* what) {
    fail_user("{} {}: cannot {} the lock file {}: {}. Choose a writable directory for {}.", key, dir.string(), what,
              path.string(), std::strerror(errno), key);
  };
  while (true) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) fail_io("create");
    bool locked = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
    if (!locked && errno == EWOULDBLOCK) {
      const std::string owner = owner_text(read_all(fd));
      ::close(fd);
      refuse_in_use(key, dir, owner, path);
    }
    // A filesystem without flock (ENOLCK, EOPNOTSUPP): the record alone decides, below.
    const bool flock_works = locked || !(errno == ENOLCK || errno == EOPNOTSUPP || errno == ENOSYS);
    if (!flock_works) spdlog::warn("{}: the filesystem has no flock; relying on the owner record alone", path.string());
    else if (!locked) {
      ::close(fd);
      fail_io("lock");
    }
    if (!same_file(fd, path)) {  // released (unlinked) by its owner between our open and flock
      ::close(fd);
      continue;
    }
    const std::string previous = read_all(fd);
    if (!previous.empty()) {
      const auto owner = parse_owner(previous);
      const bool requeued = earlier_run_of_this_job(owner);
      if (owner && owner->host != this_host() && !requeued) {
        ::close(fd);
        refuse_other_host(key, dir, *owner, path);
      }
      if (owner && !requeued && !flock_works && !owner->gone()) {
        ::close(fd);
        refuse_in_use(key, dir, owner->describe(), path);
      }
      spdlog::warn("taking over the stale lock {} of {}: {}", path.string(), owner_text(previous),
                   requeued ? "an earlier run of this Slurm job, which Slurm ended before requeueing it"
                            : "that process no longer holds it");
    }
    const auto me = ProcessOwner::self();
    json fields = {{"host", me.host}, {"pid", me.pid}, {"job", me.job}, {"started", me.started}};
    if (me.restart >= 0) fields["restart"] = me.restart;
    const std::string record = fields.dump() + "\n";
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, record.data(), record.size(), 0) != static_cast<ssize_t>(record.size()) ||
        ::fsync(fd) != 0) {
      const int saved = errno;
      ::close(fd);
      errno = saved;
      fail_io("write");
    }
    return std::unique_ptr<DirectoryLock>(new DirectoryLock(path, fd, record));
  }
}

void check_directory_free(const fs::path& dir, std::string_view key) {
  const fs::path path = dir / files::kDirectoryLock;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;  // no lock file: free
  // A shared flock is refused while a run holds the exclusive one; ours ends at close.
  const bool held = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  const std::string record = read_all(fd);
  ::close(fd);
  if (held) refuse_in_use(key, dir, owner_text(record), path);
  const auto owner = parse_owner(record);
  if (owner && owner->host != this_host() && !earlier_run_of_this_job(owner)) refuse_other_host(key, dir, *owner, path);
}

void check_directory_lock(const fs::path& dir, const std::string& record, std::string_view key) {
  const fs::path path = dir / files::kDirectoryLock;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;  // not a filesystem shared with rank 0: rank 0's lock is the job's
  const std::string seen = read_all(fd);
  ::close(fd);
  if (seen != record) {
    fail_user("{} {}: this rank sees {} held by {}, but this job's rank 0 holds it as {}. Another run uses the "
              "directory: give this run another {}.",
              key, dir.string(), path.string(), owner_text(seen), owner_text(record), key);
  }
}

void remove_abandoned_temporaries(const fs::path& dir) {
  recover_replaced_dirs(dir, "");  // an interrupted replacement's old copy is data, not garbage
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (is_abandoned_temporary(entry.path().filename().string())) fs::remove_all(entry.path(), ec);
  }
}

bool is_abandoned_temporary(const std::string& name) {
  const auto at = name.rfind(kTempInfix);
  if (at == std::string::npos) return false;
  char* end = nullptr;
  const std::string digits = name.substr(at + kTempInfix.size());
  const long pid = std::strtol(digits.c_str(), &end, 10);
  if (digits.empty() || *end != '\0' || pid <= 0) return true;  // not ours to judge by: not a live writer's name
  if (pid == ::getpid()) return true;
  return ProcessOwner{this_host(), pid, "", "", -1}.gone();
}

}  // namespace moeforge
