// defines: DatasetIdentity, identify_datasets, dataset_changes
//
// What a training checkpoint records of the datasets its run read, so that a resume notices a
// dataset replaced since (it would continue on another sample order, silently): for each prefix
// of data.data_path, the .idx's size and a hash of its contents (core/base/hash64.h: the index
// holds every document's length and place, so another dataset, a reordered or an extended one,
// changes it) and the .bin's size. The tokens are not hashed: hundreds of GB would cost minutes at
// every start, and a .bin holding other tokens of exactly the same lengths is the one change this
// misses.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::data {

struct DatasetIdentity {
  std::string prefix;  // as data.data_path names it
  int64_t idx_bytes = 0;
  uint64_t idx_hash = 0;
  int64_t bin_bytes = 0;
};

// Each prefix of `data_path` (Megatron's --data-path, data/blend.h) once, in order: every .idx is
// read whole (about a second for an index of hundreds of MB). Empty for an empty data_path.
// Throws UserError naming a file that cannot be read.
std::vector<DatasetIdentity> identify_datasets(const std::vector<std::string>& data_path);

// What differs between the datasets a checkpoint recorded and `now`, one line per file, each
// naming the file and what changed ("data/text.idx: its size changed from 100 to 120 bytes").
// Empty when the files are the same; the same files under another prefix (a moved copy) are.
std::vector<std::string> dataset_changes(const std::vector<DatasetIdentity>& recorded,
                                         const std::vector<DatasetIdentity>& now);

}  // namespace moeforge::data
