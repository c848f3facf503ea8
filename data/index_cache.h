// defines: IndexCache
//
// On-disk cache of dataset indices, keyed by a description of everything that affects them.
// Files are `<dir>/<hash>-<name>-<array>.npy` plus `<hash>-<name>-description.json`, which is
// written last and so marks a complete entry; a changed description gives a new hash, so stale
// entries are never read. Across processes (the ranks of a run, on one node or a shared
// filesystem) exactly one builds: the one that creates `<hash>-<name>.lock`; the others wait for
// the description, with a timeout and a clear error. A lock left by a dead process on this host
// is taken over.
#pragma once

#include "data/npy.h"

#include <filesystem>
#include <functional>
#include <map>
#include <string>

namespace moeforge::data {

class IndexCache {
 public:
  using Arrays = std::map<std::string, NpyArray>;

  IndexCache(std::filesystem::path dir, std::string name, std::string description, double timeout_seconds);

  // Returns the cached arrays, building (and saving) them first if needed. `build` runs in at
  // most one process; `built` tells whether this call built them.
  Arrays get_or_build(const std::function<Arrays()>& build, bool* built = nullptr);

  std::filesystem::path description_path() const;

 private:
  std::filesystem::path path_of(const std::string& array) const;
  bool complete() const;
  Arrays load() const;
  void save(const Arrays& arrays) const;

  std::filesystem::path dir_;
  std::string stem_;  // <hash>-<name>
  std::string description_;
  double timeout_seconds_;
};

}  // namespace moeforge::data
