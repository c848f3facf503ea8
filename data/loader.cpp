#include "data/loader.h"

#include "core/base/errors.h"

#include <fmt/format.h>

namespace moeforge::data {

DataLoader::DataLoader(std::shared_ptr<const SampleSource> source, int64_t micro_batch_size, int64_t dp_rank,
                       int64_t dp_size, int64_t consumed_samples, int prefetch)
    : source_(std::move(source)),
      micro_batch_(micro_batch_size),
      dp_rank_(dp_rank),
      dp_size_(dp_size),
      consumed_(consumed_samples),
      prefetch_(static_cast<size_t>(std::max(prefetch, 1))) {
  if (micro_batch_ < 1 || dp_size_ < 1 || dp_rank_ < 0 || dp_rank_ >= dp_size_ || consumed_ < 0) {
    throw std::invalid_argument(fmt::format("DataLoader: bad micro_batch {} / dp_rank {} / dp_size {} / consumed {}",
                                            micro_batch_, dp_rank_, dp_size_, consumed_));
  }
  reader_ = std::thread([this] { read_ahead(); });
}

DataLoader::~DataLoader() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  reader_.join();
}

MicroBatch DataLoader::read(int64_t chunk_start) const {
  MicroBatch b;
  b.batch = micro_batch_;
  Sample s;
  for (int64_t r = 0; r < micro_batch_; ++r) {
    const int64_t id = chunk_start + dp_rank_ * micro_batch_ + r;
    source_->get(id, s);
    b.seq = static_cast<int64_t>(s.tokens.size());
    b.sample_ids.push_back(id);
    b.tokens.insert(b.tokens.end(), s.tokens.begin(), s.tokens.end());
    b.labels.insert(b.labels.end(), s.labels.begin(), s.labels.end());
    b.loss_mask.insert(b.loss_mask.end(), s.loss_mask.begin(), s.loss_mask.end());
    b.position_ids.insert(b.position_ids.end(), s.position_ids.begin(), s.position_ids.end());
  }
  return b;
}

void DataLoader::read_ahead() {
  const int64_t chunk = micro_batch_ * dp_size_;
  int64_t next_chunk = consumed_;
  while (true) {
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return stopping_ || ready_.size() < prefetch_; });
      if (stopping_) return;
    }
    if (next_chunk + chunk > source_->size()) {  // Megatron drops the last incomplete chunk
      std::lock_guard lock(mutex_);
      exhausted_ = true;
      changed_.notify_all();
      return;
    }
    try {
      MicroBatch b = read(next_chunk);
      std::lock_guard lock(mutex_);
      ready_.push_back(std::move(b));
    } catch (...) {
      std::lock_guard lock(mutex_);
      error_ = std::current_exception();
      changed_.notify_all();
      return;
    }
    next_chunk += chunk;
    changed_.notify_all();
  }
}

MicroBatch DataLoader::next() {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return !ready_.empty() || error_ || exhausted_; });
  if (ready_.empty()) {
    if (error_) std::rethrow_exception(error_);
    fail_user("the dataset ({}) is exhausted after {} samples: it holds {} samples. Megatron sizes datasets for "
              "train_iters x global_batch_size; was the run extended past the samples it was built for?",
              source_->describe(), consumed_, source_->size());
  }
  MicroBatch b = std::move(ready_.front());
  ready_.pop_front();
  consumed_ += micro_batch_ * dp_size_;
  changed_.notify_all();
  return b;
}

}  // namespace moeforge::data
