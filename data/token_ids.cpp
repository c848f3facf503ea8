#include "data/token_ids.h"

#include "data/index_cache.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

// Everything the ids depend on, as the key of the cache entry: the same path with another
// size, modification time or inode is another file.
std::string cache_key(const IndexedDataset& d) {
  const auto& stamp = d.bin_stamp();
  const nlohmann::json key = {
      {"class", "TokenIdRange"},
      {"format", 1},
      {"bin_path", fs::absolute(bin_path(d.prefix())).lexically_normal().string()},
      {"bin_bytes", stamp.bytes},
      {"bin_mtime_ns", stamp.mtime_ns},
      {"bin_inode", stamp.inode},
      {"dtype", dtype_name(d.dtype())},
  };
  return key.dump(2);
}

std::optional<IndexCache::Problem> check_cached_range(const IndexCache::Arrays& arrays) {
  const auto it = arrays.find("range");
  if (it == arrays.end()) return IndexCache::Problem{"range", "missing"};
  const NpyArray& a = it->second;
  if (a.descr != "<i8" || a.shape != std::vector<int64_t>{2} || a.data.size() != 2 * sizeof(int64_t)) {
    return IndexCache::Problem{"range", fmt::format("dtype {}, shape [{}], expected <i8 and [2]", a.descr, fmt::join(a.shape, ", "))};
  }
  TokenIdRange r;
  std::memcpy(&r.min, a.data.data(), sizeof(int64_t));
  std::memcpy(&r.max, a.data.data() + sizeof(int64_t), sizeof(int64_t));
  if (r.empty() && (r.min != 0 || r.max != -1)) {
    return IndexCache::Problem{"range", fmt::format("[{}, {}]: the smallest id above the largest", r.min, r.max)};
  }
  return std::nullopt;
}

}  // namespace

TokenIdRange cached_token_id_range(const IndexedDataset& d, const fs::path& cache_dir, double timeout_seconds, bool* scanned,
                                   fs::path* cache_file) {
  IndexCache cache(cache_dir, "TokenIdRange", cache_key(d), timeout_seconds);
  if (cache_file) *cache_file = cache.description_path();
  TokenIdRange range;
  int64_t ids[2] = {0, -1};
  bool built = false;
  const auto arrays = cache.get_or_build(
      [&] {
        const auto start = std::chrono::steady_clock::now();
        range = d.token_id_range();
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        const auto bytes = static_cast<double>(d.bin_stamp().bytes);
        spdlog::info("token ids {}..{} of {}, scanned once ({:.2f} GiB in {:.1f} s, {:.2f} GB/s); cached in {}",
                     range.min, range.max, bin_path(d.prefix()), bytes / (1 << 30), seconds,
                     bytes / std::max(seconds, 1e-9) / 1e9, cache.description_path().string());
        ids[0] = range.min;
        ids[1] = range.max;
        return IndexCache::Views{{"range", NpyView{"<i8", {2}, ids, sizeof(ids)}}};
      },
      check_cached_range, &built);
  if (!built) {
    const auto& data = arrays.at("range").data;
    std::memcpy(&range.min, data.data(), sizeof(int64_t));
    std::memcpy(&range.max, data.data() + sizeof(int64_t), sizeof(int64_t));
  }
  if (scanned) *scanned = built;
  return range;
}

}  // namespace moeforge::data
