// defines: SafetensorsFile, SafetensorsCheckpoint, NamedTensors, save_safetensors,
//          save_safetensors_checkpoint
//
// The safetensors format (Hugging Face): an 8-byte little-endian header length N, N bytes of UTF-8
// JSON {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}, then
// the raw little-endian tensor data in C order, packed without holes (offsets count from the byte
// after the header). Files are memory-mapped and their headers validated in full when opened; a
// tensor's bytes are read only when it is asked for, so opening a 30 GB checkpoint reads only its
// headers. Our writer produces the same bytes as Python's `safetensors.torch.save_file`.
#pragma once

#include "core/files/file_names.h"

#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace moeforge {


// One safetensors file, mapped read-only. Move-only; tensors it returns own their memory.
class SafetensorsFile {
 public:
  struct Info {
    std::string dtype;  // as in the file: "BF16"
    torch::ScalarType scalar_type;
    std::vector<int64_t> shape;
    size_t begin = 0, end = 0;  // byte range in the data section (after the header)
  };

  // Throws UserError naming the file, the tensor and the fix for any malformed header or layout.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<std::string>& names() const { return names_; }  // in data-offset order
  bool contains(const std::string& name) const { return infos_.contains(name); }
  const Info& info(const std::string& name) const;  // UserError (with a "did you mean") when absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }  // "__metadata__"
  torch::Tensor tensor(const std::string& name) const;  // a copy, in the file's dtype
  // Converted to `as`, between floating types only: a float stored as an integer (or the reverse)
  // is refused naming the file and the tensor (a damaged header would load as garbage weights).
  torch::Tensor tensor(const std::string& name, torch::ScalarType as) const;
  // Stored as exactly `dtype` (a training checkpoint's recorded precision), else refused.
  torch::Tensor tensor_exactly(const std::string& name, torch::ScalarType dtype) const;

 private:
  struct Unmap {
    size_t size;
    void operator()(const std::byte* p) const;
  };
  std::string path_;
  std::unique_ptr<const std::byte, Unmap> map_;
  const std::byte* data_ = nullptr;  // start of the data section inside map_
  std::vector<std::string> names_;
  std::unordered_map<std::string, Info> infos_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: a directory with model.safetensors, or with model.safetensors.index.json
// ({"weight_map": {tensor: shard file}}) and its shards. `path` may also name the index or a single
// .safetensors file. Every shard is opened and cross-checked against the index up front.
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::string& path);

  const std::vector<std::string>& names() const { return names_; }  // shard by shard, file order
  bool contains(const std::string& name) const { return shard_of_.contains(name); }
  const SafetensorsFile& file(const std::string& name) const;  // the shard holding `name`
  const SafetensorsFile::Info& info(const std::string& name) const { return file(name).info(name); }
  torch::Tensor tensor(const std::string& name) const { return file(name).tensor(name); }
  torch::Tensor tensor(const std::string& name, torch::ScalarType as) const { return file(name).tensor(name, as); }
  const std::vector<SafetensorsFile>& shards() const { return shards_; }

 private:
  void load_index(const std::string& index_path);
  std::string path_;
  std::vector<SafetensorsFile> shards_;
  std::vector<std::string> names_;
  std::unordered_map<std::string, size_t> shard_of_;
};

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes `tensors` (any device, any strides) atomically: a temporary file in the same directory,
// fsync, rename. Tensors are laid out as the Python writer does (by dtype, widest first, then by
// name), so the bytes equal `save_file`'s whenever `metadata` has at most one entry (Python orders
// several entries randomly; we sort them).
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Writes a Hugging Face checkpoint into `dir`: model.safetensors when everything fits in
// `max_shard_bytes`, else shards model-0000i-of-0000n.safetensors split exactly as
// huggingface_hub's split_torch_state_dict_into_shards does, plus model.safetensors.index.json.
// Each file carries {"format": "pt"}, which transformers requires. Files of an earlier checkpoint
// in `dir` that the new one does not use are removed, so the directory holds one checkpoint.
void save_safetensors_checkpoint(const std::string& dir, const NamedTensors& tensors,
                                 int64_t max_shard_bytes = 5LL << 30);

}  // namespace moeforge
