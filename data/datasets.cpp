#include "data/datasets.h"

#include "core/base/errors.h"
#include "data/blend.h"
#include "data/numpy_random.h"
#include "data/tokenizer/tokenizer.h"

#include <fmt/format.h>

#include <cmath>
#include <map>

namespace moeforge::data {

void build_blending_indices(std::span<const double> weights, int64_t size, std::vector<int16_t>& dataset_index,
                            std::vector<int64_t>& dataset_sample_index) {
  dataset_index.assign(static_cast<size_t>(size), 0);
  dataset_sample_index.assign(static_cast<size_t>(size), 0);
  std::vector<int64_t> counts(weights.size(), 0);
  for (int64_t s = 0; s < size; ++s) {
    const double at = std::max(static_cast<double>(s), 1.0);
    size_t best = 0;
    double best_error = weights[0] * at - static_cast<double>(counts[0]);
    for (size_t d = 1; d < weights.size(); ++d) {
      const double error = weights[d] * at - static_cast<double>(counts[d]);
      if (error > best_error) {
        best_error = error;
        best = d;
      }
    }
    dataset_index[static_cast<size_t>(s)] = static_cast<int16_t>(best);
    dataset_sample_index[static_cast<size_t>(s)] = counts[best]++;
  }
}

namespace {
std::vector<double> normalize(const std::vector<double>& w) {
  const double sum = numpy_sum(w);
  std::vector<double> out;
  for (double v : w) out.push_back(v / sum);
  return out;
}
}  // namespace

BlendedDataset::BlendedDataset(std::vector<std::shared_ptr<const SampleSource>> datasets, std::vector<double> weights,
                               int64_t size)
    : datasets_(std::move(datasets)) {
  if (datasets_.size() >= 32767) fail_user("a blend of {} datasets is too large (Megatron's limit is 32,766)", datasets_.size());
  const auto w = normalize(weights);
  build_blending_indices(w, size, dataset_index_, dataset_sample_index_);
  std::vector<int64_t> used(datasets_.size(), 0);
  for (auto d : dataset_index_) ++used[static_cast<size_t>(d)];
  for (size_t d = 0; d < datasets_.size(); ++d) {
    if (used[d] > datasets_[d]->size()) {
      fail_user("the blend asks {} samples of {} but it has only {}. Raise that dataset's share of data, or the "
                "number of epochs it is built for.",
                used[d], datasets_[d]->describe(), datasets_[d]->size());
    }
  }
}

void BlendedDataset::get(int64_t index, Sample& out) const {
  const auto i = static_cast<size_t>(index);
  datasets_[static_cast<size_t>(dataset_index_.at(i))]->get(dataset_sample_index_[i], out);
}

std::string BlendedDataset::describe() const {
  return fmt::format("blend of {} datasets ({} samples)", datasets_.size(), dataset_index_.size());
}

DatasetSpec dataset_spec_from_config(const ExperimentConfig& c) {
  DatasetSpec spec;
  spec.data_path = c.data.data_path;
  spec.split = c.data.split;
  spec.num_samples = megatron_sample_counts(c.training);
  spec.gpt.seq_length = c.training.seq_length;
  spec.gpt.seed = static_cast<uint32_t>(c.training.seed);
  spec.gpt.vocab_size = c.model.padded_vocab_size();
  spec.gpt.cache_dir = c.data.data_cache_path;
  spec.gpt.reset_position_ids = c.data.reset_position_ids;
  spec.gpt.eod_mask_loss = c.data.eod_mask_loss;
  if (c.data.reset_position_ids || c.data.eod_mask_loss) {
    const auto tokenizer = load_tokenizer(c.data.tokenizer_model);
    if (!tokenizer->eod_id()) {
      fail_user("data.reset_position_ids / data.eod_mask_loss need an end-of-document token, and {} has none",
                tokenizer->name());
    }
    spec.gpt.eod_id = *tokenizer->eod_id();
  }
  spec.gpt.cache_timeout_seconds = c.parallel.distributed_timeout_minutes * 60.0;
  return spec;
}

std::array<std::shared_ptr<const SampleSource>, 3> build_datasets(const DatasetSpec& spec) {
  if (spec.data_path.empty()) fail_user("data.data_path is empty: name the Megatron dataset prefix(es) to train on.");
  const DatasetBlend blend = parse_blend(spec.data_path);
  const auto split = parse_split(spec.split);
  std::map<std::string, std::shared_ptr<const IndexedDataset>> opened;
  auto open = [&](const std::string& prefix) {
    auto& d = opened[prefix];
    if (!d) d = std::make_shared<const IndexedDataset>(prefix);
    return d;
  };
  // The GPT datasets of one prefix, per split, each asked for `sizes[split]` samples.
  auto gpt_splits = [&](const std::string& prefix, const std::array<std::optional<int64_t>, 3>& sizes) {
    const auto data = open(prefix);
    const auto ranges = split_document_ranges(split, data->num_sequences());
    std::array<std::shared_ptr<const SampleSource>, 3> out;
    for (size_t i = 0; i < 3; ++i) {
      if (ranges[i] && spec.build[i]) out[i] = std::make_shared<const GPTDataset>(data, static_cast<Split>(i), *ranges[i], sizes[i], spec.gpt);
    }
    return out;
  };

  const auto& n = spec.num_samples;
  if (blend.prefixes.size() == 1 && !blend.weights) return gpt_splits(blend.prefixes[0], {n[0], n[1], n[2]});

  std::array<std::shared_ptr<const SampleSource>, 3> result;
  std::vector<std::array<std::shared_ptr<const SampleSource>, 3>> per_dataset;
  if (blend.weights) {
    const auto w = normalize(*blend.weights);
    std::vector<std::array<int64_t, 3>> targets;
    for (size_t d = 0; d < w.size(); ++d) {
      std::array<std::optional<int64_t>, 3> buffer;
      std::array<int64_t, 3> target{};
      for (size_t i = 0; i < 3; ++i) {
        const double t = std::ceil(static_cast<double>(n[i]) * w[d]);
        target[i] = static_cast<int64_t>(t);
        buffer[i] = static_cast<int64_t>(std::ceil(t * (1.0 + spec.mid_level_dataset_surplus)));
      }
      targets.push_back(target);
      per_dataset.push_back(gpt_splits(blend.prefixes[d], buffer));
    }
    for (size_t i = 0; i < 3; ++i) {
      if (!per_dataset[0][i]) continue;
      std::vector<std::shared_ptr<const SampleSource>> parts;
      int64_t size = 0;
      for (size_t d = 0; d < w.size(); ++d) {
        parts.push_back(per_dataset[d][i]);
        size += targets[d][i];
      }
      result[i] = std::make_shared<const BlendedDataset>(parts, w, size);
    }
    return result;
  }
  // Several prefixes without weights: one epoch of each, blended in proportion to their sizes.
  for (const auto& prefix : blend.prefixes) per_dataset.push_back(gpt_splits(prefix, {std::nullopt, std::nullopt, std::nullopt}));
  for (size_t i = 0; i < 3; ++i) {
    if (!per_dataset[0][i]) continue;
    std::vector<std::shared_ptr<const SampleSource>> parts;
    std::vector<double> sizes;
    int64_t total = 0;
    for (auto& d : per_dataset) {
      parts.push_back(d[i]);
      sizes.push_back(static_cast<double>(d[i]->size()));
      total += d[i]->size();
    }
    result[i] = std::make_shared<const BlendedDataset>(parts, sizes, std::min(n[i], total));
  }
  return result;
}

}  // namespace moeforge::data
