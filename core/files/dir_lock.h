// defines: ProcessOwner, DirectoryLock, check_directory_free, check_directory_lock, is_abandoned_temporary,
//          remove_abandoned_temporaries
//
// A run owns its output directories (logging.run_dir, checkpoint.save) for as long as it runs:
// `<dir>/moeforge.lock` holds the owner (host, pid, the launcher's job id, start time) and an
// exclusive flock(2) on it. The kernel drops the flock when the process dies, however it dies, so
// on the same host a lock whose flock is free is stale and is taken over with a warning. A record
// from another host is never taken over: flock across hosts (NFS, Lustre) is not trustworthy, so
// the message names the owner and says to delete the file once that job has ended. One exception:
// a record of an earlier run of this very Slurm job (the same SLURM_JOB_ID, a lower
// SLURM_RESTART_COUNT: `sbatch --requeue` after a node failure or preemption), which Slurm ended
// before it started this one, so its rank 0 may have been on any node.
// A release unlinks the file while still holding the flock; an acquirer that got the flock on a
// just-unlinked file notices (the path no longer names its inode) and tries again.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

namespace moeforge {

// Who holds a lock or wrote a temporary.
struct ProcessOwner {
  std::string host;
  int64_t pid = 0;
  std::string job;      // the launcher's job id (Slurm, PBS, LSF, PMIx namespace), or "none"
  std::string started;  // UTC, ISO 8601
  int64_t restart = -1;  // under Slurm, SLURM_RESTART_COUNT (0 before any requeue); -1 elsewhere

  static ProcessOwner self();
  std::string describe() const;  // "pid 123 on host h (job 42, started 2026-12-01T20:00:00Z)"
  // This host, and no such process (or only its zombie): it can hold nothing any more.
  bool gone() const;
  // An earlier run of the Slurm job this process belongs to (requeued since): ended, on any host.
  bool earlier_run_of(const ProcessOwner& me) const;
};

std::string this_host();

class DirectoryLock {
 public:
  // Takes the lock of `dir` (created if missing) for this process, or throws a UserError naming
  // `key` (the config key naming `dir`), the owner and what to do.
  static std::unique_ptr<DirectoryLock> acquire(const std::filesystem::path& dir, std::string_view key);
  ~DirectoryLock();  // unlinks the lock file, then drops the flock
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

  const std::string& record() const { return record_; }  // the lock file's content
  const std::filesystem::path& path() const { return path_; }

 private:
  DirectoryLock(std::filesystem::path path, int fd, std::string record);
  std::filesystem::path path_;
  int fd_;
  std::string record_;
};

// What DirectoryLock::acquire would refuse (a live run's lock, a lock from another host), checked
// without writing anything (`train --dry-run`).
void check_directory_free(const std::filesystem::path& dir, std::string_view key);

// The other ranks of a job: when this process sees `dir`'s lock file (a shared filesystem), it
// must hold `record`, rank 0's; otherwise another job owns the directory (UserError).
void check_directory_lock(const std::filesystem::path& dir, const std::string& record, std::string_view key);

// `name` is a temporary (`*.tmp-<pid>`, core/files/durable_file.h) that no live process on this host
// other than this one can be writing: this process's own, or one of a process that is gone.
bool is_abandoned_temporary(const std::string& name);

// Removes the abandoned temporaries directly in `dir` (files or directories), for the owner of
// `dir`'s lock: what a killed run left (a checkpoint's `iter_N.tmp-<pid>/`, `environment.json.tmp-<pid>`).
// An old copy an interrupted replace_dir_durably left is put back first (core/files/replace_dir.h).
void remove_abandoned_temporaries(const std::filesystem::path& dir);

}  // namespace moeforge
