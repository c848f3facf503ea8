// defines: MicroBatch, DataLoader
//
// Micro-batches for one data-parallel rank in Megatron's order (MegatronPretrainingSampler):
// global samples are consumed consecutively from `consumed_samples` in chunks of
// micro_batch * dp; rank r takes samples [r * micro_batch, (r + 1) * micro_batch) of each chunk.
// A background thread reads ahead a few micro-batches. Resuming needs only consumed_samples.
#pragma once

#include "data/gpt_dataset.h"

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace moeforge::data {

struct MicroBatch {
  int64_t batch = 0;  // samples
  int64_t seq = 0;    // tokens per sample
  std::vector<int64_t> sample_ids;    // global sample index of each row
  std::vector<int64_t> tokens;        // batch x seq, row-major
  std::vector<int64_t> labels;        // batch x seq
  std::vector<float> loss_mask;       // batch x seq
  std::vector<int64_t> position_ids;  // batch x seq
};

class DataLoader {
 public:
  DataLoader(std::shared_ptr<const SampleSource> source, int64_t micro_batch_size, int64_t dp_rank, int64_t dp_size,
             int64_t consumed_samples, int prefetch = 4);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // The next micro-batch; throws UserError when the dataset is exhausted (as Megatron's sampler
  // stops) and rethrows any error the reader thread met (e.g. an out-of-vocabulary token).
  MicroBatch next();
  // Global samples consumed by all data-parallel ranks through the micro-batches returned so far.
  int64_t consumed_samples() const { return consumed_; }

 private:
  void read_ahead();
  MicroBatch read(int64_t chunk_start) const;

  std::shared_ptr<const SampleSource> source_;
  int64_t micro_batch_, dp_rank_, dp_size_, consumed_;
  size_t prefetch_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<MicroBatch> ready_;
  std::exception_ptr error_;
  bool exhausted_ = false;
  bool stopping_ = false;
  std::thread reader_;
};

}  // namespace moeforge::data
