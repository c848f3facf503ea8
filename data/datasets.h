// defines: BlendedDataset, build_blending_indices, DatasetSpec, build_datasets,
//          dataset_spec_from_config
//
// Megatron-Core's BlendedMegatronDatasetBuilder: the train/valid/test datasets for a data_path
// (one prefix, or a blend) and a split, with the same per-dataset sample requests, surplus and
// greedy blending, so a blend feeds the same samples in the same order as Megatron.
#pragma once

#include "core/config/config.h"
#include "data/gpt_dataset.h"

#include <array>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace moeforge::data {

// Megatron's helpers.build_blending_indices: for each sample s, the dataset maximizing
// w_i * max(s, 1) - count_i (first maximum wins), and that dataset's running count.
void build_blending_indices(std::span<const double> weights, int64_t size, std::vector<int16_t>& dataset_index,
                            std::vector<int64_t>& dataset_sample_index);

class BlendedDataset : public SampleSource {
 public:
  // `weights` are normalized here (as Megatron does when a size is given).
  BlendedDataset(std::vector<std::shared_ptr<const SampleSource>> datasets, std::vector<double> weights, int64_t size);
  int64_t size() const override { return static_cast<int64_t>(dataset_index_.size()); }
  void get(int64_t index, Sample& out) const override;
  std::string describe() const override;
  const std::vector<int16_t>& dataset_index() const { return dataset_index_; }
  const std::vector<int64_t>& dataset_sample_index() const { return dataset_sample_index_; }
  const std::vector<std::shared_ptr<const SampleSource>>& datasets() const { return datasets_; }

 private:
  std::vector<std::shared_ptr<const SampleSource>> datasets_;
  std::vector<int16_t> dataset_index_;
  std::vector<int64_t> dataset_sample_index_;
};

struct DatasetSpec {
  std::vector<std::string> data_path;  // Megatron's --data-path (see data/blend.h)
  std::string split = "969, 30, 1";
  std::array<int64_t, 3> num_samples{};  // train, valid, test
  // Which splits to build: only those a caller uses (the trainer: train, and valid when it
  // evaluates; `data samples`: the one asked for). A split not built is never checked, so a split
  // that rounds to no documents only fails a run that needs it.
  std::array<bool, 3> build{true, true, true};
  GPTDatasetOptions gpt;
  double mid_level_dataset_surplus = 0.005;  // Megatron's default
};

DatasetSpec dataset_spec_from_config(const ExperimentConfig& config);

// One SampleSource per split (null where the split is empty or not asked for in spec.build).
std::array<std::shared_ptr<const SampleSource>, 3> build_datasets(const DatasetSpec& spec);

}  // namespace moeforge::data
