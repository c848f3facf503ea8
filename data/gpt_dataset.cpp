#include "data/gpt_dataset.h"

#include "core/base/errors.h"
#include "data/index_cache.h"
#include "data/numpy_random.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <span>
#include <tuple>

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {
// Megatron's add_extra_token_to_sequence: a sample reads seq_length + 1 tokens so that the
// labels are the tokens shifted by one.
constexpr int64_t kExtraToken = 1;
}  // namespace

const char* split_name(Split split) {
  switch (split) {
    case Split::train: return "train";
    case Split::valid: return "valid";
    case Split::test: return "test";
  }
  return "?";
}

std::array<std::optional<std::pair<int64_t, int64_t>>, 3> split_document_ranges(const std::array<double, 3>& split,
                                                                                int64_t num_sequences) {
  std::array<std::optional<std::pair<int64_t, int64_t>>, 3> out;
  double lo = 0.0;
  for (size_t i = 0; i < 3; ++i) {
    const double hi = lo + split[i];
    if (hi > lo) {  // Megatron drops zero-width bookends
      // std::nearbyint rounds half to even under the default rounding mode, as Python's round.
      const auto begin = static_cast<int64_t>(std::nearbyint(lo * static_cast<double>(num_sequences)));
      const auto end = static_cast<int64_t>(std::nearbyint(hi * static_cast<double>(num_sequences)));
      out[i] = std::make_pair(begin, end);
    }
    lo = hi;
  }
  return out;
}

std::array<int64_t, 3> megatron_sample_counts(const TrainingConfig& t) {
  return {t.train_iters * t.global_batch_size,
          (t.train_iters / t.eval_interval + 1) * t.eval_iters * t.global_batch_size,
          t.eval_iters * t.global_batch_size};
}

GPTIndices build_gpt_indices(std::span<const int32_t> lengths, int64_t begin, int64_t end,
                             std::optional<int64_t> num_samples, int64_t seq_length, uint32_t seed) {
  GPTIndices idx;
  const int64_t n_docs = end - begin;
  int64_t tokens_per_epoch = 0;
  for (int64_t d = begin; d < end; ++d) tokens_per_epoch += lengths[static_cast<size_t>(d)];
  if (tokens_per_epoch <= kExtraToken) {
    fail_user("the split [{}, {}) holds {} tokens: too few for even one sample of {} tokens. Use a larger dataset or "
              "change data.split.",
              begin, end, tokens_per_epoch, seq_length);
  }
  // Epochs: the smallest E with E * tokens_per_epoch >= num_samples * seq_length + 1.
  if (num_samples) {
    const int64_t requested = *num_samples * seq_length + kExtraToken;
    while (idx.num_epochs * tokens_per_epoch < requested) ++idx.num_epochs;
  }
  const int64_t E = idx.num_epochs;
  int64_t samples_sans_final = 0;
  if (E > 1) {
    samples_sans_final = ((E - 1) * tokens_per_epoch - kExtraToken) / seq_length;
    const int64_t from_final = *num_samples - samples_sans_final;
    const int64_t per_epoch = (tokens_per_epoch - kExtraToken) / seq_length;
    idx.separate_final_epoch = from_final < static_cast<int64_t>(0.80 * static_cast<double>(per_epoch));
  }

  NumpyRandomState rng(seed);
  // 1. document index: the split's sequence ids, E times, shuffled (the last epoch separately).
  auto epochs_of_documents = [&](int64_t epochs) {
    std::vector<int32_t> ids(static_cast<size_t>(epochs * n_docs));
    for (int64_t e = 0; e < epochs; ++e) {
      for (int64_t d = 0; d < n_docs; ++d) ids[static_cast<size_t>(e * n_docs + d)] = static_cast<int32_t>(begin + d);
    }
    rng.shuffle(std::span<int32_t>(ids));
    return ids;
  };
  if (!idx.separate_final_epoch) {
    idx.document_index = epochs_of_documents(E);
  } else {
    idx.document_index = epochs_of_documents(E - 1);
    const auto last = epochs_of_documents(1);
    idx.document_index.insert(idx.document_index.end(), last.begin(), last.end());
  }

  // 2. sample index (Megatron's helpers.build_sample_idx with drop_last_partial_sequence). The
  // lengths are gathered in document_index order first (prefetched), so the walk is sequential.
  const auto doc_count = static_cast<int64_t>(idx.document_index.size());
  std::vector<int32_t> doc_length(static_cast<size_t>(doc_count));
  for (size_t p = 0; p < doc_length.size(); ++p) {
    if (p + 32 < doc_length.size()) __builtin_prefetch(&lengths[static_cast<size_t>(idx.document_index[p + 32])]);
    doc_length[p] = lengths[static_cast<size_t>(idx.document_index[p])];
  }
  const int64_t total_samples = (E * tokens_per_epoch - kExtraToken) / seq_length;
  auto& sample = idx.sample_index;
  sample.resize(static_cast<size_t>(2 * (total_samples + 1)));
  int64_t doc_pos = 0;
  int64_t doc_offset = 0;
  sample[0] = 0;
  sample[1] = 0;
  for (int64_t s = 1; s <= total_samples; ++s) {
    int64_t remaining = seq_length + kExtraToken;
    while (remaining != 0) {
      const int64_t doc_remaining = doc_length[static_cast<size_t>(doc_pos)] - doc_offset;
      remaining -= doc_remaining;
      if (remaining <= 0) {
        doc_offset += remaining + doc_remaining - kExtraToken;
        remaining = 0;
      } else if (doc_pos == doc_count - 1) {
        doc_offset = doc_length[static_cast<size_t>(doc_pos)] - kExtraToken;
        break;
      } else {
        ++doc_pos;
        doc_offset = 0;
      }
    }
    sample[static_cast<size_t>(2 * s)] = doc_pos;
    sample[static_cast<size_t>(2 * s + 1)] = doc_offset;
  }

  // 3. shuffle index: the samples, with those of a separate final epoch shuffled on their own.
  const int64_t first = idx.separate_final_epoch ? samples_sans_final : total_samples;
  idx.shuffle_index.resize(static_cast<size_t>(total_samples));
  for (int64_t i = 0; i < total_samples; ++i) idx.shuffle_index[static_cast<size_t>(i)] = i;
  auto& sh = idx.shuffle_index;
  // numpy shuffles the uint32 (or int64) array; the element type does not change the draws.
  rng.shuffle(std::span<int64_t>(sh.data(), static_cast<size_t>(first)));
  if (first < total_samples) rng.shuffle(std::span<int64_t>(sh.data() + first, static_cast<size_t>(total_samples - first)));
  return idx;
}

namespace {

std::string cache_description(const IndexedDataset& d, Split split, std::pair<int64_t, int64_t> range,
                              std::optional<int64_t> num_samples, const GPTDatasetOptions& o) {
  const fs::path idx = fs::absolute(idx_path(d.prefix()));
  nlohmann::json j = {
      {"class", "GPTDataset"},
      {"format", 1},
      {"path_prefix", fs::absolute(d.prefix()).lexically_normal().string()},
      {"idx_bytes", fs::file_size(idx)},
      {"idx_mtime_ns", std::chrono::duration_cast<std::chrono::nanoseconds>(fs::last_write_time(idx).time_since_epoch()).count()},
      {"split", split_name(split)},
      {"range", {range.first, range.second}},
      {"num_samples", num_samples ? nlohmann::json(*num_samples) : nlohmann::json(nullptr)},
      {"sequence_length", o.seq_length},
      {"random_seed", o.seed},
      {"add_extra_token_to_sequence", true},
  };
  return j.dump(2);
}

template <typename T>
NpyView view(const std::vector<T>& v, const char* descr, std::vector<int64_t> shape) {
  return NpyView{descr, std::move(shape), v.data(), v.size() * sizeof(T)};
}

template <typename T>
std::vector<T> from_npy(const NpyArray& a, const std::string& what) {
  if (a.data.size() % sizeof(T) != 0) fail_user("cached index {} has the wrong element size; delete the cache", what);
  std::vector<T> v(a.data.size() / sizeof(T));
  std::memcpy(v.data(), a.data.data(), a.data.size());
  return v;
}

// Everything read_text relies on, checked once when a cache is loaded: a damaged or edited
// cache file must be rebuilt, never followed out of bounds.
std::optional<IndexCache::Problem> check_cached_indices(const IndexCache::Arrays& arrays, std::span<const int32_t> lengths,
                                                        std::pair<int64_t, int64_t> range, int64_t seq_length) {
  using P = IndexCache::Problem;
  auto shape_problem = [&](const char* name, const char* descr, size_t dims) -> std::optional<P> {
    const auto it = arrays.find(name);
    if (it == arrays.end()) return P{name, "missing"};
    const auto& a = it->second;
    if (a.descr != descr) return P{name, fmt::format("dtype {}, expected {}", a.descr, descr)};
    if (a.shape.size() != dims || (dims == 2 && a.shape[1] != 2)) {
      return P{name, fmt::format("shape [{}], expected {}", fmt::join(a.shape, ", "), dims == 2 ? "[n, 2]" : "one dimension")};
    }
    return std::nullopt;
  };
  for (const auto& [name, descr, dims] : {std::tuple{"document_index", "<i4", 1}, std::tuple{"sample_index", "<i8", 2},
                                           std::tuple{"shuffle_index", "<i8", 1}, std::tuple{"epochs", "<i8", 1}}) {
    if (auto p = shape_problem(name, descr, static_cast<size_t>(dims))) return p;
  }
  const auto docs = from_npy<int32_t>(arrays.at("document_index"), "document_index");
  const auto samples = from_npy<int64_t>(arrays.at("sample_index"), "sample_index");
  const auto shuffle = from_npy<int64_t>(arrays.at("shuffle_index"), "shuffle_index");
  const auto epochs = from_npy<int64_t>(arrays.at("epochs"), "epochs");
  if (epochs.size() != 2 || epochs[0] < 1 || (epochs[1] != 0 && epochs[1] != 1)) {
    return P{"epochs", fmt::format("[{}], expected [epochs >= 1, 0 or 1]", fmt::join(epochs, ", "))};
  }
  for (size_t i = 0; i < docs.size(); ++i) {
    if (docs[i] < range.first || docs[i] >= range.second) {
      return P{"document_index", fmt::format("entry {} is document {}, outside the split's documents [{}, {})", i, docs[i],
                                             range.first, range.second)};
    }
  }
  const int64_t rows = static_cast<int64_t>(samples.size() / 2);
  if (rows < 2) return P{"sample_index", fmt::format("{} rows, expected at least 2", rows)};
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t d = samples[2 * j], o = samples[2 * j + 1];
    if (d < 0 || d >= static_cast<int64_t>(docs.size()) || o < 0 || (o > 0 && o >= lengths[static_cast<size_t>(docs[d])])) {
      return P{"sample_index", fmt::format("row {} is ({}, {}), outside the document index", j, d, o)};
    }
    if (j == 0) continue;
    // Each sample is seq_length + 1 tokens from the previous row's position to this one's.
    const int64_t d0 = samples[2 * j - 2], o0 = samples[2 * j - 1];
    if (d < d0) return P{"sample_index", fmt::format("row {} goes back to document position {}", j, d)};
    int64_t tokens = o + 1 - o0;
    for (int64_t pos = d0; pos < d; ++pos) tokens += lengths[static_cast<size_t>(docs[pos])];
    if (tokens != seq_length + 1) {
      return P{"sample_index", fmt::format("sample {} spans {} tokens, expected {}", j - 1, tokens, seq_length + 1)};
    }
  }
  if (shuffle.size() > static_cast<size_t>(rows - 1)) {
    return P{"shuffle_index", fmt::format("{} entries for {} samples", shuffle.size(), rows - 1)};
  }
  for (size_t i = 0; i < shuffle.size(); ++i) {
    if (shuffle[i] < 0 || shuffle[i] >= rows - 1) {
      return P{"shuffle_index", fmt::format("entry {} is sample {}, outside [0, {})", i, shuffle[i], rows - 1)};
    }
  }
  return std::nullopt;
}

}  // namespace

GPTDataset::GPTDataset(std::shared_ptr<const IndexedDataset> dataset, Split split, std::pair<int64_t, int64_t> range,
                       std::optional<int64_t> num_samples, const GPTDatasetOptions& options)
    : dataset_(std::move(dataset)), split_(split), options_(options) {
  if (options.seq_length < 2) fail_user("training.seq_length must be at least 2, got {}", options.seq_length);
  IndexCache cache(index_cache_dir(options.cache_dir, dataset_->prefix()), fmt::format("GPTDataset-{}", split_name(split)),
                   cache_description(*dataset_, split, range, num_samples, options), options.cache_timeout_seconds);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int64_t> epochs;
  const auto arrays = cache.get_or_build(
      [&] {
        indices_ = build_gpt_indices(dataset_->sequence_lengths(), range.first, range.second, num_samples,
                                     options.seq_length, options.seed);
        epochs = {indices_.num_epochs, indices_.separate_final_epoch ? 1 : 0};
        const auto rows = static_cast<int64_t>(indices_.sample_index.size() / 2);
        return IndexCache::Views{
            {"document_index", view(indices_.document_index, "<i4", {static_cast<int64_t>(indices_.document_index.size())})},
            {"sample_index", view(indices_.sample_index, "<i8", {rows, 2})},
            {"shuffle_index", view(indices_.shuffle_index, "<i8", {static_cast<int64_t>(indices_.shuffle_index.size())})},
            {"epochs", view(epochs, "<i8", {2})},
        };
      },
      [&](const IndexCache::Arrays& a) {
        return check_cached_indices(a, dataset_->sequence_lengths(), range, options.seq_length);
      },
      &built_);
  if (!built_) {
    indices_.document_index = from_npy<int32_t>(arrays.at("document_index"), "document_index");
    indices_.sample_index = from_npy<int64_t>(arrays.at("sample_index"), "sample_index");
    indices_.shuffle_index = from_npy<int64_t>(arrays.at("shuffle_index"), "shuffle_index");
    epochs = from_npy<int64_t>(arrays.at("epochs"), "epochs");
    indices_.num_epochs = epochs.at(0);
    indices_.separate_final_epoch = epochs.at(1) != 0;
  }
  build_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  spdlog::info("{} indices for {} ({} samples, {} epoch(s){}) {} in {:.3f} s", split_name(split), dataset_->prefix(),
               size(), indices_.num_epochs, indices_.separate_final_epoch ? ", separate final epoch" : "",
               built_ ? "built" : "loaded from cache", build_seconds_);
}

std::string GPTDataset::describe() const { return fmt::format("{} ({} split)", dataset_->prefix(), split_name(split_)); }

void GPTDataset::read_text(int64_t index, std::vector<int64_t>& text) const {
  const auto j = static_cast<size_t>(indices_.shuffle_index.at(static_cast<size_t>(index)));
  const int64_t d0 = indices_.sample_index[2 * j], o0 = indices_.sample_index[2 * j + 1];
  const int64_t d1 = indices_.sample_index[2 * j + 2], o1 = indices_.sample_index[2 * j + 3];
  text.resize(static_cast<size_t>(options_.seq_length + kExtraToken));
  int64_t* out = text.data();
  const auto& lengths = dataset_->sequence_lengths();
  for (int64_t pos = d0; pos <= d1; ++pos) {
    const int32_t doc = indices_.document_index[static_cast<size_t>(pos)];
    const int64_t offset = pos == d0 ? o0 : 0;
    const int64_t stop = pos == d1 ? o1 + kExtraToken : lengths[static_cast<size_t>(doc)];
    dataset_->read(doc, offset, stop - offset, out);
    out += stop - offset;
  }
  if (out != text.data() + text.size()) {
    throw std::logic_error(fmt::format("{}: sample {} has {} tokens, expected {}", describe(), index, out - text.data(),
                                       text.size()));
  }
}

void GPTDataset::get(int64_t index, Sample& s) const {
  std::vector<int64_t> text;
  read_text(index, text);
  const int64_t n = options_.seq_length;
  if (options_.vocab_size > 0) {
    for (size_t k = 0; k < text.size(); ++k) {
      if (text[k] < 0 || text[k] >= options_.vocab_size) {
        fail_user("{}: sample {} holds token id {} at position {}, outside the model's vocabulary of {} ids. The dataset "
                  "was made with another tokenizer, or model.vocab_size is too small.",
                  describe(), index, text[k], k, options_.vocab_size);
      }
    }
  }
  s.tokens.assign(text.begin(), text.end() - 1);
  s.labels.assign(text.begin() + 1, text.end());
  s.loss_mask.assign(static_cast<size_t>(n), 1.0f);
  s.position_ids.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) s.position_ids[static_cast<size_t>(i)] = i;
  if (options_.eod_mask_loss || options_.reset_position_ids) {
    // Megatron subtracts (i + 1 - prev) from every later position at each EOD i, so a position
    // counts from just after the last EOD before it.
    int64_t start = 0;
    for (int64_t i = 0; i < n; ++i) {
      const auto k = static_cast<size_t>(i);
      if (options_.reset_position_ids) s.position_ids[k] = i - start;
      if (s.tokens[k] == options_.eod_id) {
        if (options_.eod_mask_loss) s.loss_mask[k] = 0.0f;
        start = i + 1;
      }
    }
  }
}

}  // namespace moeforge::data
