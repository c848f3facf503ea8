// defines: the `moeforge data ...` subcommands (inspect, samples, merge, preprocess).
#pragma once

#include "data/preprocess.h"

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

struct DataInspectOptions {
  std::string prefix;
  bool json = false;
};
int run_data_inspect(const DataInspectOptions& options);

struct DataSamplesOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string split = "train";
  int64_t first = 4;
  bool json = false;
  std::string decode;  // a tokenizer (tokenizer.json or "byte"): also print each sample's text
};
int run_data_samples(const DataSamplesOptions& options);

struct DataMergeOptions {
  std::vector<std::string> inputs;
  std::string output_prefix;
};
int run_data_merge(const DataMergeOptions& options);

int run_data_preprocess(const data::PreprocessOptions& options);

}  // namespace moeforge
