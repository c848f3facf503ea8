// defines: IndexCache, index_cache_dir
//
// On-disk cache of dataset indices, keyed by a description of everything that affects them.
// Files are `<dir>/<hash>-<name>-<array>.npy` plus `<hash>-<name>-description.json`, which is
// written last and so marks a complete entry; a changed description gives a new hash, so stale
// entries are never read. Across processes (the ranks of a run, on one node or a shared
// filesystem) exactly one builds: the one that creates `<hash>-<name>.lock`; the others wait for
// the description, with a timeout and a clear error. A lock left by a dead process on this host
// is taken over. Loaded arrays are validated by the caller's check; a cache that fails it (a
// damaged, edited or deleted file) is rebuilt, with a warning naming the file.
#pragma once

#include "data/npy.h"

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>

namespace moeforge::data {

// Where the caches of the dataset `prefix` live: data.data_cache_path (`configured`) when set,
// else Megatron's <dataset dir>/cache/GPTDataset_indices.
std::filesystem::path index_cache_dir(const std::string& configured, const std::string& prefix);

// An array to save, viewed in place (no copy).
struct NpyView {
  std::string descr;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t bytes = 0;
};

class IndexCache {
 public:
  using Arrays = std::map<std::string, NpyArray>;
  using Views = std::map<std::string, NpyView>;

  IndexCache(std::filesystem::path dir, std::string name, std::string description, double timeout_seconds);

  // What is wrong with one cached array (`array` names it: its file is named in the warning).
  struct Problem {
    std::string array;
    std::string why;
  };
  // The caller's validation of loaded arrays (all present, dtypes, shapes, value ranges).
  using Check = std::function<std::optional<Problem>(const Arrays&)>;

  // Returns the cached arrays when they pass `check`; or, when there are none yet or they fail it
  // (a warning names the file and the problem), runs `build` (in at most one process), saves the
  // arrays it returns views of, and returns nothing: the caller keeps what it built. `built`
  // tells which happened.
  Arrays get_or_build(const std::function<Views()>& build, const Check& check, bool* built = nullptr);

  std::filesystem::path description_path() const;

 private:
  std::filesystem::path path_of(const std::string& array) const;
  bool complete() const;
  Arrays load() const;
  // The complete entry's arrays if they load and pass `check`; otherwise the entry is marked
  // incomplete (its description removed) so that it is rebuilt.
  std::optional<Arrays> load_valid(const Check& check) const;
  void save(const Views& arrays) const;

  std::filesystem::path dir_;
  std::string stem_;  // <hash>-<name>
  std::string description_;
  double timeout_seconds_;
};

}  // namespace moeforge::data
