// defines: Split, split_name, split_document_ranges, megatron_sample_counts, GPTIndices,
//          build_gpt_indices, Sample, SampleSource, GPTDatasetOptions, GPTDataset
//
// Megatron-Core's GPTDataset, bit for bit: the same split ranges, epochs, separate-final-epoch
// rule, document/sample/shuffle indices (numpy's MT19937 shuffles) and sample contents, so that
// the same seed, split, sequence length and sample counts feed the same tokens in the same order.
#pragma once

#include "core/config/config.h"
#include "data/indexed_dataset.h"

#include <array>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace moeforge::data {

enum class Split { train = 0, valid = 1, test = 2 };
const char* split_name(Split split);

// Megatron's split matrix applied to `num_sequences`: [begin, end) per split, with
// begin = round(lo * n) and end = round(hi * n) (half to even); zero-width splits are absent.
std::array<std::optional<std::pair<int64_t, int64_t>>, 3> split_document_ranges(const std::array<double, 3>& split,
                                                                                int64_t num_sequences);

// Samples Megatron's training loop asks each split for: train_iters * global_batch,
// (train_iters / eval_interval + 1) * eval_iters * global_batch, eval_iters * global_batch.
std::array<int64_t, 3> megatron_sample_counts(const TrainingConfig& training);

struct GPTIndices {
  std::vector<int32_t> document_index;  // sequence ids, epoch after epoch, shuffled
  std::vector<int64_t> sample_index;    // (position in document_index, token offset) x (samples + 1)
  std::vector<int64_t> shuffle_index;   // sample order
  int64_t num_epochs = 1;
  bool separate_final_epoch = false;
};

// Megatron's _build_document_sample_shuffle_indices for sequences [begin, end) of a dataset with
// these lengths. num_samples nullopt = exactly one epoch.
GPTIndices build_gpt_indices(std::span<const int32_t> sequence_lengths, int64_t begin, int64_t end,
                             std::optional<int64_t> num_samples, int64_t seq_length, uint32_t seed);

// One training sample of seq_length tokens.
struct Sample {
  std::vector<int64_t> tokens;
  std::vector<int64_t> labels;
  std::vector<float> loss_mask;
  std::vector<int64_t> position_ids;
};

// A dataset of samples (a GPTDataset, or a blend of them).
class SampleSource {
 public:
  virtual ~SampleSource() = default;
  virtual int64_t size() const = 0;
  virtual void get(int64_t index, Sample& out) const = 0;
  virtual std::string describe() const = 0;
};

struct GPTDatasetOptions {
  int64_t seq_length = 0;
  uint32_t seed = 1234;
  bool reset_position_ids = false;
  bool eod_mask_loss = false;
  int64_t eod_id = -1;       // needed by the two options above
  int64_t vocab_size = 0;    // token ids must be < this; 0 = unchecked
  std::string cache_dir;     // empty = <dataset dir>/cache/GPTDataset_indices
  double cache_timeout_seconds = 600;
};

class GPTDataset : public SampleSource {
 public:
  GPTDataset(std::shared_ptr<const IndexedDataset> dataset, Split split, std::pair<int64_t, int64_t> range,
             std::optional<int64_t> num_samples, const GPTDatasetOptions& options);

  int64_t size() const override { return static_cast<int64_t>(indices_.shuffle_index.size()); }
  void get(int64_t index, Sample& out) const override;
  std::string describe() const override;

  // The seq_length + 1 token ids of sample `index` (Megatron's _query_document_sample_shuffle_indices).
  void read_text(int64_t index, std::vector<int64_t>& text) const;
  const GPTIndices& indices() const { return indices_; }
  bool built_indices() const { return built_; }  // false: loaded from the cache
  double index_build_seconds() const { return build_seconds_; }

 private:
  std::shared_ptr<const IndexedDataset> dataset_;
  Split split_;
  GPTDatasetOptions options_;
  GPTIndices indices_;
  bool built_ = false;
  double build_seconds_ = 0;
};

}  // namespace moeforge::data
