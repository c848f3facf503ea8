// defines: TokenDType, dtype_code, dtype_size, optimal_dtype, unsigned_dtype_max, FileStamp, TokenIdRange,
//          IndexedDataset, IndexedDatasetBuilder, idx_path, bin_path
//
// Megatron's indexed dataset: `PREFIX.bin` holds token ids back to back; `PREFIX.idx` holds
// (little-endian, packed) the magic "MMIDIDX\0\0", u64 version 1, u8 dtype code, u64 sequence
// count N, u64 document-index count D, int32 lengths[N], int64 byte pointers[N], int64
// document_index[D], and for multimodal files int8 modes[N]. We read files Megatron wrote and
// write byte-identical ones (docs/data.md).
#pragma once

#include "core/files/durable_file.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace moeforge::data {

// Megatron's DType codes.
enum class TokenDType : uint8_t {
  uint8 = 1, int8 = 2, int16 = 3, int32 = 4, int64 = 5, float64 = 6, float32 = 7, uint16 = 8,
};

size_t dtype_size(TokenDType dtype);
const char* dtype_name(TokenDType dtype);
// Megatron's choice for token ids: uint16 when the vocabulary has fewer than 65,500 ids, else int32.
TokenDType optimal_dtype(int64_t vocab_size);
// The largest id of a dtype that holds no negative id (255 for uint8, 65,535 for uint16): every
// token of such a dataset lies in [0, this] without reading it. Nothing for the other dtypes.
std::optional<int64_t> unsigned_dtype_max(TokenDType dtype);

// What identifies a file's content without reading it, as fstat saw it when it was opened.
struct FileStamp {
  int64_t bytes = 0;
  int64_t mtime_ns = 0;
  uint64_t inode = 0;
};

// The smallest and largest token id of a dataset; max < min when it holds no token.
struct TokenIdRange {
  int64_t min = 0;
  int64_t max = -1;
  bool empty() const { return max < min; }
};

std::string idx_path(const std::string& prefix);
std::string bin_path(const std::string& prefix);

// A read-only, memory-mapped dataset. Opening validates every invariant of the format and throws
// UserError naming the file, the offset or index, and what was expected.
class IndexedDataset {
 public:
  explicit IndexedDataset(const std::string& prefix);
  ~IndexedDataset();
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  const std::string& prefix() const { return prefix_; }
  TokenDType dtype() const { return dtype_; }
  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_documents() const { return static_cast<int64_t>(document_index_.size()) - 1; }
  bool multimodal() const { return multimodal_; }

  // The arrays of the .idx, copied out of the mapping (they are unaligned there).
  const std::vector<int32_t>& sequence_lengths() const { return lengths_; }
  const std::vector<int64_t>& sequence_pointers() const { return pointers_; }
  const std::vector<int64_t>& document_index() const { return document_index_; }
  const std::vector<int8_t>& sequence_modes() const { return modes_; }

  // Copies `count` tokens of sequence `i` starting at token `offset` into `out`, converted to
  // int64 (Megatron's dataset.get(i, offset, length)).
  void read(int64_t i, int64_t offset, int64_t count, int64_t* out) const;
  // The raw bytes of sequence `i`.
  std::span<const std::byte> sequence_bytes(int64_t i) const;
  // The .bin when it was mapped: a scan's result belongs to this stamp.
  const FileStamp& bin_stamp() const { return bin_stamp_; }
  // The smallest and largest token id over the whole .bin: a full sequential scan, logged every
  // few GiB (data/token_ids.h caches it).
  TokenIdRange token_id_range() const;

 private:
  std::string prefix_;
  TokenDType dtype_ = TokenDType::int32;
  int64_t num_sequences_ = 0;
  bool multimodal_ = false;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> pointers_;
  std::vector<int64_t> document_index_;
  std::vector<int8_t> modes_;
  const std::byte* bin_ = nullptr;
  size_t bin_size_ = 0;
  FileStamp bin_stamp_;
};

// Writes a dataset the way Megatron's IndexedDatasetBuilder does. Both files are durable writes
// (core/files/durable_file.h) that finalize() commits, the .bin first, so an interrupted build never
// leaves a dataset under the final name.
class IndexedDatasetBuilder {
 public:
  IndexedDatasetBuilder(const std::string& prefix, TokenDType dtype);
  ~IndexedDatasetBuilder();  // removes the temporary files if finalize() was not reached
  IndexedDatasetBuilder(const IndexedDatasetBuilder&) = delete;
  IndexedDatasetBuilder& operator=(const IndexedDatasetBuilder&) = delete;

  // One sequence (Megatron's add_item).
  void add_item(std::span<const int64_t> tokens);
  // Ends the current document (Megatron's end_document).
  void end_document();
  // add_item + end_document: one document of one sequence, as preprocess_data.py writes.
  void add_document(std::span<const int64_t> tokens);
  // Appends a whole dataset of the same dtype (Megatron's add_index / merge_datasets.py).
  void add_index(const std::string& prefix);
  // Writes the .idx and renames both files into place.
  void finalize();

  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return num_tokens_; }

 private:
  std::string prefix_;
  TokenDType dtype_;
  std::unique_ptr<DurableFile> bin_;  // the .bin, complete under its name only after finalize()
  std::vector<int32_t> lengths_;
  std::vector<int64_t> document_index_{0};
  std::vector<std::byte> buffer_;
  int64_t num_tokens_ = 0;
};

}  // namespace moeforge::data
