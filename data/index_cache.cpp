#include "data/index_cache.h"

#include "core/files/dir_lock.h"
#include "core/files/durable_file.h"
#include "core/base/errors.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <sstream>
#include <thread>
#include <unistd.h>

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

// FNV-1a, 64 bit: stable across builds and platforms (std::hash is not).
std::string stable_hash(const std::string& text) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return fmt::format("{:016x}", h);
}

std::string read_text(const fs::path& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace

fs::path index_cache_dir(const std::string& configured, const std::string& prefix) {
  return configured.empty() ? fs::path(prefix).parent_path() / "cache" / "GPTDataset_indices" : fs::path(configured);
}

IndexCache::IndexCache(fs::path dir, std::string name, std::string description, double timeout_seconds)
    : dir_(std::move(dir)),
      stem_(stable_hash(description) + "-" + name),
      description_(std::move(description)),
      timeout_seconds_(timeout_seconds) {}

fs::path IndexCache::path_of(const std::string& array) const { return dir_ / (stem_ + "-" + array + ".npy"); }
fs::path IndexCache::description_path() const { return dir_ / (stem_ + "-description.json"); }

bool IndexCache::complete() const {
  // Equal text, not just an equal hash: a collision must never serve the wrong indices.
  return fs::exists(description_path()) && read_text(description_path()) == description_;
}

IndexCache::Arrays IndexCache::load() const {
  Arrays arrays;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string file = entry.path().filename().string();
    const std::string prefix = stem_ + "-";
    if (file.rfind(prefix, 0) == 0 && entry.path().extension() == ".npy") {
      const std::string array = file.substr(prefix.size(), file.size() - prefix.size() - 4);
      arrays[array] = read_npy(entry.path().string());
    }
  }
  return arrays;
}

std::optional<IndexCache::Arrays> IndexCache::load_valid(const Check& check) const {
  if (!complete()) return std::nullopt;
  std::optional<Problem> problem;
  Arrays arrays;
  try {
    arrays = load();
    problem = check(arrays);
  } catch (const UserError& e) {  // an unreadable .npy names itself
    problem = Problem{"", e.what()};
  }
  if (!problem) return arrays;
  spdlog::warn("the dataset index cache {} is damaged: {}{}. Rebuilding it.",
               problem->array.empty() ? description_path().string() : path_of(problem->array).string(), problem->why,
               problem->array.empty() ? "" : fmt::format(" ({})", problem->array));
  std::error_code ec;
  fs::remove(description_path(), ec);  // incomplete now: whoever takes the lock rebuilds it
  return std::nullopt;
}

void IndexCache::save(const Views& arrays) const {
  for (const auto& [array, a] : arrays) write_npy(path_of(array).string(), a.descr, a.shape, a.data, a.bytes);
  write_file_durably(description_path(), description_);  // last: marks the entry complete
}

IndexCache::Arrays IndexCache::get_or_build(const std::function<Views()>& build, const Check& check, bool* built) {
  if (built) *built = false;
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) {
    fail_user("cannot create the index cache directory {}: {}. Set data.data_cache_path to a writable directory.",
              dir_.string(), ec.message());
  }
  if (auto arrays = load_valid(check)) return *arrays;

  const fs::path lock = dir_ / (stem_ + ".lock");
  const auto start = std::chrono::steady_clock::now();
  auto last_note = start;
  while (true) {
    const int fd = ::open(lock.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
    if (fd >= 0) {
      const std::string owner = fmt::format("{} {}", this_host(), ::getpid());
      [[maybe_unused]] const auto n = ::write(fd, owner.data(), owner.size());
      ::close(fd);
      struct Unlock {
        fs::path p;
        ~Unlock() { std::error_code e; fs::remove(p, e); }
      } unlock{lock};
      if (auto arrays = load_valid(check)) return *arrays;  // finished by another process between our checks
      save(build());
      if (built) *built = true;
      return {};
    }
    if (errno != EEXIST) {
      fail_user("cannot create lock {}: {}. Set data.data_cache_path to a writable directory.", lock.string(),
                std::strerror(errno));
    }
    if (auto arrays = load_valid(check)) return *arrays;
    // A lock from a process on this host that no longer exists is stale: take it over.
    std::istringstream owner(read_text(lock));
    std::string host;
    long pid = 0;
    if (owner >> host >> pid && ProcessOwner{host, pid, "", "", -1}.gone()) {
      spdlog::warn("removing stale index-cache lock {} (process {} is gone)", lock.string(), pid);
      fs::remove(lock, ec);
      continue;
    }
    const auto now = std::chrono::steady_clock::now();
    const double waited = std::chrono::duration<double>(now - start).count();
    if (waited > timeout_seconds_) {
      fail_user("timed out after {:.0f} s waiting for another process to build the dataset indices {} (lock {} held "
                "by '{}'). If no process is building them, delete the lock file; raise "
                "parallel.distributed_timeout_minutes if building takes longer.",
                waited, description_path().string(), lock.string(), read_text(lock));
    }
    if (now - last_note > std::chrono::seconds(10)) {
      spdlog::info("waiting for '{}' to build the dataset indices ({:.0f} s)", read_text(lock), waited);
      last_note = now;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

}  // namespace moeforge::data
