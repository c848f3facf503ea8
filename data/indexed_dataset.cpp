#include "data/indexed_dataset.h"

#include "core/base/errors.h"
#include "data/sigbus_guard.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <limits>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moeforge::data {

namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kVersion = 1;
constexpr size_t kHeaderSize = 9 + 8 + 1 + 8 + 8;  // magic, version, dtype, N, D

bool valid_code(uint8_t code) { return code >= 1 && code <= 8; }

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
decltype(auto) visit_dtype(TokenDType dtype, F&& f) {
  switch (dtype) {
    case TokenDType::uint8: return f(uint8_t{});
    case TokenDType::int8: return f(int8_t{});
    case TokenDType::int16: return f(int16_t{});
    case TokenDType::int32: return f(int32_t{});
    case TokenDType::int64: return f(int64_t{});
    case TokenDType::float64: return f(double{});
    case TokenDType::float32: return f(float{});
    case TokenDType::uint16: return f(uint16_t{});
  }
  throw std::logic_error("unknown dtype");
}

// A read-only mapping of a whole file.
struct Mapping {
  const std::byte* data = nullptr;
  size_t size = 0;
  FileStamp stamp;
};

Mapping map_file(const std::string& path, const char* what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fail_user("cannot open {} ({}): {}. Check the dataset prefix (data.data_path names PREFIX for PREFIX.bin and "
              "PREFIX.idx).",
              path, what, std::strerror(errno));
  }
  struct stat st {};
  ::fstat(fd, &st);
  Mapping m;
  m.size = static_cast<size_t>(st.st_size);
  m.stamp = {static_cast<int64_t>(st.st_size), static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec,
             static_cast<uint64_t>(st.st_ino)};
  if (m.size > 0) {
    void* p = ::mmap(nullptr, m.size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail_user("cannot memory-map {}: {}", path, std::strerror(err));
    }
    m.data = static_cast<const std::byte*>(p);
    guard_mapping(m.data, m.size, path);
  }
  ::close(fd);
  return m;
}

void unmap(const std::byte* data, size_t size) {
  if (!data) return;
  unguard_mapping(data);
  ::munmap(const_cast<std::byte*>(data), size);
}

template <typename T>
T load(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // unaligned in the mapping: never dereference a cast pointer
  return v;
}

}  // namespace

size_t dtype_size(TokenDType dtype) {
  return visit_dtype(dtype, [](auto v) { return sizeof(v); });
}

const char* dtype_name(TokenDType dtype) {
  switch (dtype) {
    case TokenDType::uint8: return "uint8";
    case TokenDType::int8: return "int8";
    case TokenDType::int16: return "int16";
    case TokenDType::int32: return "int32";
    case TokenDType::int64: return "int64";
    case TokenDType::float64: return "float64";
    case TokenDType::float32: return "float32";
    case TokenDType::uint16: return "uint16";
  }
  return "?";
}

TokenDType optimal_dtype(int64_t vocab_size) { return vocab_size < 65500 ? TokenDType::uint16 : TokenDType::int32; }

std::optional<int64_t> unsigned_dtype_max(TokenDType dtype) {
  if (dtype == TokenDType::uint8) return std::numeric_limits<uint8_t>::max();
  if (dtype == TokenDType::uint16) return std::numeric_limits<uint16_t>::max();
  return std::nullopt;
}

std::string idx_path(const std::string& prefix) { return prefix + ".idx"; }
std::string bin_path(const std::string& prefix) { return prefix + ".bin"; }

// ---- reader ------------------------------------------------------------------------------------

IndexedDataset::IndexedDataset(const std::string& prefix) : prefix_(prefix) {
  const std::string idx = idx_path(prefix);
  const Mapping m = map_file(idx, "the index");
  // The .idx is read once into vectors; the mapping is only needed while validating.
  struct Unmap {
    Mapping m;
    ~Unmap() { unmap(m.data, m.size); }
  } guard{m};
  const std::byte* p = m.data;
  if (m.size < kHeaderSize) {
    fail_user("{}: truncated index: {} bytes, a header needs {}. The file is not a Megatron .idx or was cut short.",
              idx, m.size, kHeaderSize);
  }
  if (std::memcmp(p, kMagic, sizeof(kMagic)) != 0) {
    fail_user("{}: bad magic at offset 0: expected \"MMIDIDX\\0\\0\"; this is not a Megatron indexed-dataset index "
              "(or is the old lazy/cached format, which moeforge does not read).",
              idx);
  }
  const auto version = load<uint64_t>(p + 9);
  if (version != kVersion) fail_user("{}: offset 9: version {}, expected {}.", idx, version, kVersion);
  const auto code = load<uint8_t>(p + 17);
  if (!valid_code(code)) fail_user("{}: offset 17: dtype code {} is not one of Megatron's codes 1..8.", idx, code);
  dtype_ = static_cast<TokenDType>(code);
  const auto n = load<uint64_t>(p + 18);
  const auto d = load<uint64_t>(p + 26);
  const uint64_t arrays = 12 * n + 8 * d;
  if (n > m.size || d > m.size || kHeaderSize + arrays > m.size) {
    fail_user("{}: header says {} sequences and {} document-index entries ({} bytes of arrays from offset {}), but the "
              "file has {} bytes.",
              idx, n, d, arrays, kHeaderSize, m.size);
  }
  const uint64_t rest = m.size - kHeaderSize - arrays;
  if (rest == n && n > 0) {
    multimodal_ = true;
  } else if (rest != 0) {
    fail_user("{}: {} unexpected bytes after the document index (offset {}); expected none, or {} mode bytes of a "
              "multimodal file.",
              idx, rest, kHeaderSize + arrays, n);
  }
  num_sequences_ = static_cast<int64_t>(n);
  lengths_.resize(n);
  pointers_.resize(n);
  document_index_.resize(d);
  // (memcpy with an empty vector's null data() is undefined even for 0 bytes: the fuzzer found it)
  if (n > 0) {
    std::memcpy(lengths_.data(), p + kHeaderSize, 4 * n);
    std::memcpy(pointers_.data(), p + kHeaderSize + 4 * n, 8 * n);
  }
  if (d > 0) std::memcpy(document_index_.data(), p + kHeaderSize + 12 * n, 8 * d);
  if (multimodal_) {
    modes_.resize(n);
    std::memcpy(modes_.data(), p + kHeaderSize + arrays, n);
  }

  // Document index: prefix form [0, ..., N], non-decreasing.
  if (d < 1) fail_user("{}: the document index is empty; it must hold at least [0].", idx);
  if (document_index_.front() != 0) {
    fail_user("{}: document_index[0] is {} (offset {}); expected 0.", idx, document_index_.front(), kHeaderSize + 12 * n);
  }
  for (size_t j = 1; j < d; ++j) {
    if (document_index_[j] < document_index_[j - 1]) {
      fail_user("{}: document_index[{}] = {} is below document_index[{}] = {} (offset {}); the index must not decrease.",
                idx, j, document_index_[j], j - 1, document_index_[j - 1], kHeaderSize + 12 * n + 8 * j);
    }
  }
  if (document_index_.back() != static_cast<int64_t>(n)) {
    fail_user("{}: the last document_index entry is {}; expected the sequence count {}.", idx, document_index_.back(), n);
  }
  // Pointers advance by length * itemsize from 0.
  const auto item = static_cast<int64_t>(dtype_size(dtype_));
  int64_t expected = 0;
  for (size_t i = 0; i < n; ++i) {
    if (lengths_[i] < 0) {
      fail_user("{}: sequence {} has negative length {} (offset {}).", idx, i, lengths_[i], kHeaderSize + 4 * i);
    }
    if (pointers_[i] != expected) {
      fail_user("{}: sequence {} starts at byte {} of the .bin (pointer at offset {}); expected {} (the previous "
                "sequence's end).",
                idx, i, pointers_[i], kHeaderSize + 4 * n + 8 * i, expected);
    }
    expected += lengths_[i] * item;
  }

  const std::string bin = bin_path(prefix);
  const Mapping b = map_file(bin, "the token data");
  bin_ = b.data;
  bin_size_ = b.size;
  bin_stamp_ = b.stamp;
  if (static_cast<int64_t>(bin_size_) < expected) {
    unmap(bin_, bin_size_);
    bin_ = nullptr;
    fail_user("{}: {} bytes, but {} says its {} sequences end at byte {}. The .bin is truncated or belongs to another "
              "index.",
              bin, bin_size_, idx, n, expected);
  }
  if (bin_) ::madvise(const_cast<std::byte*>(bin_), bin_size_, MADV_RANDOM);
}

IndexedDataset::~IndexedDataset() { unmap(bin_, bin_size_); }

std::span<const std::byte> IndexedDataset::sequence_bytes(int64_t i) const {
  const auto item = dtype_size(dtype_);
  return {bin_ + pointers_[static_cast<size_t>(i)], static_cast<size_t>(lengths_[static_cast<size_t>(i)]) * item};
}

void IndexedDataset::read(int64_t i, int64_t offset, int64_t count, int64_t* out) const {
  if (i < 0 || i >= num_sequences_ || offset < 0 || count < 0 || offset + count > lengths_[static_cast<size_t>(i)]) {
    throw std::out_of_range(fmt::format("{}: read of sequence {} tokens [{}, {}) outside its length {}", prefix_, i,
                                        offset, offset + count, i >= 0 && i < num_sequences_ ? lengths_[static_cast<size_t>(i)] : -1));
  }
  if (count == 0) return;  // (out may be an empty vector's null data(): no memcpy at all)
  const std::byte* src = bin_ + pointers_[static_cast<size_t>(i)];
  visit_dtype(dtype_, [&](auto zero) {
    using T = decltype(zero);
    const std::byte* base = src + static_cast<size_t>(offset) * sizeof(T);
    if constexpr (std::is_same_v<T, int64_t>) {
      std::memcpy(out, base, static_cast<size_t>(count) * sizeof(T));
    } else {
      for (int64_t k = 0; k < count; ++k) out[k] = static_cast<int64_t>(load<T>(base + static_cast<size_t>(k) * sizeof(T)));
    }
  });
}

namespace {

// The min and max of `count` tokens of type T at `bytes`, through an aligned buffer (the loop over
// it is a fixed length the compiler vectorizes).
template <typename T>
void fold_min_max(const std::byte* bytes, size_t count, T& lo, T& hi) {
  constexpr size_t kBlock = 65536 / sizeof(T);
  alignas(64) T block[kBlock];
  for (size_t at = 0; at < count; at += kBlock) {
    const size_t n = std::min(kBlock, count - at);
    std::memcpy(block, bytes + at * sizeof(T), n * sizeof(T));
    std::fill(block + n, block + kBlock, block[0]);  // a short last block: pad with a token already counted
    for (size_t k = 0; k < kBlock; ++k) {
      lo = std::min(lo, block[k]);
      hi = std::max(hi, block[k]);
    }
  }
}

}  // namespace

TokenIdRange IndexedDataset::token_id_range() const {
  const int64_t total = num_sequences_ == 0 ? 0 : pointers_.back() / static_cast<int64_t>(dtype_size(dtype_)) + lengths_.back();
  if (total == 0) return {};
  // Read once, front to back, a chunk at a time: each chunk's pages are faulted in at once with the
  // kernel's read-ahead (the mapping is MADV_RANDOM for training's reads, which would fault a cold
  // file in page by page) and dropped from this process after it, so that a scan of hundreds of GB
  // on a login node holds one chunk, not the file.
  const size_t bytes = static_cast<size_t>(total) * dtype_size(dtype_);
  auto* const mapped = const_cast<std::byte*>(bin_);
  ::madvise(mapped, bytes, MADV_SEQUENTIAL);
  constexpr size_t kChunk = size_t{256} << 20;   // page-aligned, a multiple of every dtype's size
  constexpr size_t kLogEvery = size_t{4} << 30;  // a progress line every 4 GiB
  const auto start = std::chrono::steady_clock::now();
  const auto range = visit_dtype(dtype_, [&](auto zero) {
    using T = decltype(zero);
    T lo = std::numeric_limits<T>::max(), hi = std::numeric_limits<T>::lowest();
    for (size_t at = 0; at < bytes; at += kChunk) {
      const size_t n = std::min(kChunk, bytes - at);
#ifdef MADV_POPULATE_READ
      ::madvise(mapped + at, n, MADV_POPULATE_READ);  // a kernel before 5.14 refuses it: the loop faults them in
#endif
      fold_min_max(bin_ + at, n / sizeof(T), lo, hi);
      ::madvise(mapped + at, n, MADV_DONTNEED);  // a read-only file mapping: the pages stay in the page cache
      if ((at + n) % kLogEvery == 0 && at + n < bytes) {
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        spdlog::info("scanning {} for its token ids: {:.0f} of {:.0f} GiB ({:.1f} GB/s)", bin_path(prefix_),
                     static_cast<double>(at + n) / (1 << 30), static_cast<double>(bytes) / (1 << 30),
                     static_cast<double>(at + n) / seconds / 1e9);
      }
    }
    return TokenIdRange{static_cast<int64_t>(lo), static_cast<int64_t>(hi)};
  });
  ::madvise(mapped, bytes, MADV_RANDOM);
  return range;
}

// ---- writer ------------------------------------------------------------------------------------

IndexedDatasetBuilder::IndexedDatasetBuilder(const std::string& prefix, TokenDType dtype)
    : prefix_(prefix), dtype_(dtype) {
  const auto dir = std::filesystem::path(prefix).parent_path();
  if (!dir.empty()) std::filesystem::create_directories(dir);
  bin_ = std::make_unique<DurableFile>(bin_path(prefix));
}

IndexedDatasetBuilder::~IndexedDatasetBuilder() = default;

void IndexedDatasetBuilder::add_item(std::span<const int64_t> tokens) {
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    fail_user("{}: a sequence of {} tokens does not fit Megatron's int32 lengths; split the document.", prefix_, tokens.size());
  }
  visit_dtype(dtype_, [&](auto zero) {
    using T = decltype(zero);
    buffer_.resize(tokens.size() * sizeof(T));
    for (size_t k = 0; k < tokens.size(); ++k) {
      if constexpr (std::is_integral_v<T>) {
        if (tokens[k] < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
            tokens[k] > static_cast<int64_t>(std::numeric_limits<T>::max())) {
          fail_user("{}: token id {} does not fit the dataset dtype {}; use a wider dtype (int32 for vocabularies of "
                    "65,500 ids or more).",
                    prefix_, tokens[k], dtype_name(dtype_));
        }
      }
      const T v = static_cast<T>(tokens[k]);
      std::memcpy(buffer_.data() + k * sizeof(T), &v, sizeof(T));
    }
  });
  bin_->write(buffer_.data(), buffer_.size());
  lengths_.push_back(static_cast<int32_t>(tokens.size()));
  num_tokens_ += static_cast<int64_t>(tokens.size());
}

void IndexedDatasetBuilder::end_document() { document_index_.push_back(static_cast<int64_t>(lengths_.size())); }

void IndexedDatasetBuilder::add_document(std::span<const int64_t> tokens) {
  add_item(tokens);
  end_document();
}

void IndexedDatasetBuilder::add_index(const std::string& prefix) {
  const IndexedDataset other(prefix);
  if (other.dtype() != dtype_) {
    fail_user("cannot merge {} (dtype {}) into {} (dtype {}): every input must have the same dtype.", prefix,
              dtype_name(other.dtype()), prefix_, dtype_name(dtype_));
  }
  const auto offset = static_cast<int64_t>(lengths_.size());
  lengths_.insert(lengths_.end(), other.sequence_lengths().begin(), other.sequence_lengths().end());
  for (size_t j = 1; j < other.document_index().size(); ++j) document_index_.push_back(offset + other.document_index()[j]);
  for (int64_t i = 0; i < other.num_sequences(); ++i) {
    const auto bytes = other.sequence_bytes(i);
    bin_->write(bytes.data(), bytes.size());
    num_tokens_ += other.sequence_lengths()[static_cast<size_t>(i)];
  }
}

void IndexedDatasetBuilder::finalize() {
  const auto n = static_cast<uint64_t>(lengths_.size());
  const auto d = static_cast<uint64_t>(document_index_.size());
  const auto code = static_cast<uint8_t>(dtype_);
  std::vector<int64_t> pointers(n);
  int64_t at = 0;
  const auto item = static_cast<int64_t>(dtype_size(dtype_));
  for (size_t i = 0; i < n; ++i) {
    pointers[i] = at;
    at += lengths_[i] * item;
  }
  DurableFile idx(idx_path(prefix_));
  idx.write(kMagic, sizeof(kMagic));
  idx.write(&kVersion, 8);
  idx.write(&code, 1);
  idx.write(&n, 8);
  idx.write(&d, 8);
  idx.write(lengths_.data(), 4 * n);
  idx.write(pointers.data(), 8 * n);
  idx.write(document_index_.data(), 8 * d);
  // The .bin first: a reader finds no .idx until both are complete.
  bin_->commit();
  idx.commit();
}

}  // namespace moeforge::data
