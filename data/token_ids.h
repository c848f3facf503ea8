// defines: cached_token_id_range
//
// The smallest and largest token id of a dataset, which a run checks against the model's
// vocabulary before it starts (an id outside it stopped training at the first sample holding it).
// A Megatron index does not record them, and finding them reads the whole .bin: hundreds of GB for
// real data. So a scan's result is cached in the dataset's index cache (data/index_cache.h: one
// process scans, the others wait) under a key of the .bin's path, size, modification time and
// inode: each file is scanned once, and again only when it is replaced or rewritten.
#pragma once

#include "data/indexed_dataset.h"

#include <filesystem>

namespace moeforge::data {

// The ids of `d` from the cache in `cache_dir` when its entry's key matches the .bin as `d` mapped
// it; otherwise scanned (by one process; the others wait up to `timeout_seconds`) and cached.
// `scanned` tells which; `cache_file` names the entry.
TokenIdRange cached_token_id_range(const IndexedDataset& d, const std::filesystem::path& cache_dir, double timeout_seconds,
                                   bool* scanned = nullptr, std::filesystem::path* cache_file = nullptr);

}  // namespace moeforge::data
