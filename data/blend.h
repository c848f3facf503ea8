// defines: parse_split, DatasetBlend, parse_blend, validate_data_config
//
// Megatron's readings of `--split` and `--data-path` (megatron/core/datasets/utils.py:
// parse_and_normalize_split, get_blend_from_list), so that the same strings mean the same thing.
#pragma once

#include "core/config/config.h"

#include <array>
#include <optional>
#include <string>
#include <vector>

namespace moeforge::data {

// "99,1,0" -> {0.99, 0.01, 0.0}: the numbers in the string (missing ones are 0), normalized to
// sum to 1, in train/valid/test order. Throws UserError for more than three numbers, a negative
// or malformed number, or an all-zero split.
std::array<double, 3> parse_split(const std::string& split);

struct DatasetBlend {
  std::vector<std::string> prefixes;
  std::optional<std::vector<double>> weights;  // as written (not normalized); absent = by size
};

// [prefix] or [prefix, prefix, ...] -> prefixes without weights; [w1, prefix1, w2, prefix2, ...]
// -> weighted. Entries are split on whitespace first, so "0.3 a 0.7 b" is one valid entry.
DatasetBlend parse_blend(const std::vector<std::string>& data_path);

// Checks data.split and data.data_path; throws UserError naming the key and value.
void validate_data_config(const DataConfig& data);

}  // namespace moeforge::data
