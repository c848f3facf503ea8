#include "core/files/safetensors.h"

#include "core/files/durable_file.h"
#include "core/base/errors.h"
#include "core/files/safetensors_header.h"
#include "core/base/text_distance.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <numeric>
#include <optional>
#include <regex>
#include <set>
#include <string_view>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moeforge {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; reading and writing it as raw bytes needs a little-endian host");

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// LibTorch's type of each kSafetensorsDTypes entry, in the same order.
constexpr std::array<torch::ScalarType, kSafetensorsDTypes.size()> kScalarTypes = {
    torch::ScalarType::Bool,          torch::ScalarType::Byte,           torch::ScalarType::Char,
    torch::ScalarType::Float8_e5m2,   torch::ScalarType::Float8_e4m3fn,  torch::ScalarType::Float8_e8m0fnu,
    torch::ScalarType::Float8_e4m3fnuz, torch::ScalarType::Float8_e5m2fnuz, torch::ScalarType::Short,
    torch::ScalarType::UInt16,        torch::ScalarType::Half,           torch::ScalarType::BFloat16,
    torch::ScalarType::Int,           torch::ScalarType::UInt32,         torch::ScalarType::Float,
    torch::ScalarType::ComplexFloat,  torch::ScalarType::Double,         torch::ScalarType::Long,
    torch::ScalarType::UInt64,
};

size_t dtype_rank(torch::ScalarType type) { return static_cast<size_t>(std::ranges::find(kScalarTypes, type) - kScalarTypes.begin()); }


std::string did_you_mean(const std::string& name, const std::vector<std::string>& names) {
  const auto m = closest_match(name, names);
  return m ? fmt::format(" (did you mean \"{}\"?)", *m) : "";
}

// ---- writing -------------------------------------------------------------------------------------

// A string as JSON, escaped exactly as serde_json (the Python writer's serializer) escapes it.
std::string json_string(const std::string& s, const std::string& path, const char* what) {
  try {
    return json(s).dump();
  } catch (const json::type_error&) {
    fail_user("cannot write {}: {} \"{}\" is not valid UTF-8, which the JSON header requires.", path, what, s);
  }
}

void create_parent(const fs::path& path) {
  std::error_code ec;
  if (!path.parent_path().empty()) fs::create_directories(path.parent_path(), ec);
  if (ec) fail_user("cannot create directory {}: {}.", path.parent_path().string(), ec.message());
}

void check_tensors(const std::string& path, const NamedTensors& tensors) {
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") fail_user("cannot write {}: \"__metadata__\" is reserved and cannot name a tensor.", path);
    if (!seen.insert(name).second) fail_user("cannot write {}: tensor \"{}\" is given twice; names must be unique.", path, name);
    if (!t.defined()) fail_user("cannot write {}: tensor \"{}\" is undefined.", path, name);
    if (t.layout() != torch::kStrided) {
      fail_user("cannot write {}: tensor \"{}\" is not dense (layout {}); call .to_dense() first.", path, name,
                c10::str(t.layout()));
    }
    if (dtype_rank(t.scalar_type()) == kScalarTypes.size()) {
      fail_user("cannot write {}: tensor \"{}\" has dtype {}, which safetensors cannot store; convert it to one of {}.",
                path, name, c10::toString(t.scalar_type()), safetensors_dtype_names());
    }
  }
}

int64_t nbytes(const torch::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace

// ---- SafetensorsFile -----------------------------------------------------------------------------

void SafetensorsFile::Unmap::operator()(const std::byte* p) const { ::munmap(const_cast<std::byte*>(p), size); }

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_user("cannot open {}: {}. Check the checkpoint path.", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail_user("{} is not a regular file; a safetensors path must name a file.", path);
  }
  const auto size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail_user("{}: {} bytes, but a safetensors file starts with an 8-byte header length. The file is truncated or "
              "not a safetensors file.",
              path, size);
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (p == MAP_FAILED) fail_user("cannot memory-map {}: {}.", path, std::strerror(map_errno));
  map_ = {static_cast<const std::byte*>(p), Unmap{size}};

  auto header = parse_safetensors_header(map_.get(), size, path);
  data_ = map_.get() + header.data_offset;
  names_ = std::move(header.names);
  metadata_ = std::move(header.metadata);
  for (auto& [name, e] : header.entries) {
    infos_.emplace(name, Info{std::move(e.dtype), kScalarTypes[e.dtype_index], std::move(e.shape), e.begin, e.end});
  }
}

const SafetensorsFile::Info& SafetensorsFile::info(const std::string& name) const {
  const auto it = infos_.find(name);
  if (it == infos_.end()) {
    fail_user("{} has no tensor \"{}\"{}. Check the name, or that this checkpoint belongs to this model.", path_,
              name, did_you_mean(name, names_));
  }
  return it->second;
}

torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const Info& i = info(name);
  // Copied with memcpy rather than from_blob + clone: the mapping need not be aligned for the
  // dtype, and one copy is all that is needed.
  torch::Tensor t = torch::empty(i.shape, torch::TensorOptions().dtype(i.scalar_type));
  if (i.end > i.begin) std::memcpy(t.data_ptr(), data_ + i.begin, i.end - i.begin);
  return t;
}

torch::Tensor SafetensorsFile::tensor(const std::string& name, torch::ScalarType as) const {
  const Info& i = info(name);
  if (c10::isFloatingType(i.scalar_type) != c10::isFloatingType(as)) {
    fail_user("{}: tensor {} is stored as {}, where {} is expected: the file is damaged or holds something else. Point at "
              "another checkpoint.",
              path_, name, i.dtype, c10::isFloatingType(as) ? "a floating-point type" : "an integer type");
  }
  return tensor(name).to(as);
}

torch::Tensor SafetensorsFile::tensor_exactly(const std::string& name, torch::ScalarType dtype) const {
  const Info& i = info(name);
  if (i.scalar_type != dtype) {
    fail_user("{}: tensor {} is stored as {}, but this checkpoint records {}: the file is damaged. Point at another "
              "checkpoint.",
              path_, name, i.dtype, c10::toString(dtype));
  }
  return tensor(name);
}

// ---- SafetensorsCheckpoint -----------------------------------------------------------------------

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& path) : path_(path) {
  const fs::path p(path);
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    const bool single = fs::exists(p / files::kSafetensors, ec), index = fs::exists(p / files::kSafetensorsIndex, ec);
    if (single && index) {
      fail_user("{} holds both {} and {}, so which is the checkpoint is ambiguous. Remove the stale one.", path,
                files::kSafetensors, files::kSafetensorsIndex);
    }
    if (!single && !index) {
      fail_user("{} holds neither {} nor {}: it is not a safetensors checkpoint. (A PyTorch .bin checkpoint must be "
                "converted to safetensors first.)",
                path, files::kSafetensors, files::kSafetensorsIndex);
    }
    if (index) {
      load_index((p / files::kSafetensorsIndex).string());
      return;
    }
    shards_.emplace_back((p / files::kSafetensors).string());
  } else if (!fs::exists(p, ec)) {
    fail_user("checkpoint {} does not exist. Check the path.", path);
  } else if (p.extension() == ".json") {
    load_index(path);
    return;
  } else {
    shards_.emplace_back(path);
  }
  names_ = shards_[0].names();
  for (const auto& name : names_) shard_of_.emplace(name, 0);
}

void SafetensorsCheckpoint::load_index(const std::string& index_path) {
  std::ifstream in(index_path, std::ios::binary);
  if (!in) fail_user("cannot open {}: {}.", index_path, std::strerror(errno));
  json index;
  try {
    index = json::parse(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } catch (const json::exception& e) {
    fail_user("{} is not valid JSON: {}. Re-save or re-download the checkpoint.", index_path, e.what());
  }
  if (!index.is_object() || !index.contains("weight_map") || !index.at("weight_map").is_object()) {
    fail_user("{} has no \"weight_map\" object; a checkpoint index is {{\"metadata\": {{...}}, \"weight_map\": "
              "{{tensor: shard file}}}}.",
              index_path);
  }
  const json& weight_map = index.at("weight_map");
  std::map<std::string, std::vector<std::string>> by_file;  // sorted: model-00001-of-... first
  for (const auto& [name, file] : weight_map.items()) {
    if (!file.is_string()) fail_user("{}: \"weight_map\" maps \"{}\" to {}, expected a shard file name.", index_path, name, show_json(file));
    by_file[file.get<std::string>()].push_back(name);
  }
  const fs::path dir = fs::path(index_path).parent_path();
  constexpr const char* kMismatchFix = "The index and the shards come from different saves; re-save or re-download the checkpoint.";
  for (const auto& [file, names] : by_file) {
    const std::string shard_path = (dir / file).string();
    std::error_code ec;
    if (!fs::exists(shard_path, ec)) {
      fail_user("{} maps {} tensors (\"{}\", ...) to {}, but {} does not exist. The checkpoint is incomplete: copy or "
                "download every shard.",
                index_path, names.size(), names[0], file, shard_path);
    }
    const SafetensorsFile& shard = shards_.emplace_back(shard_path);
    for (const auto& name : names) {
      if (!shard.contains(name)) fail_user("{} maps tensor \"{}\" to {}, but that shard has no such tensor. {}", index_path, name, file, kMismatchFix);
    }
    for (const auto& name : shard.names()) {
      const auto listed = weight_map.find(name);
      if (listed == weight_map.end() || *listed != file) {
        fail_user("{} holds tensor \"{}\", which {} {}. {}", shard_path, name, index_path,
                  listed == weight_map.end() ? "does not list" : "maps to " + listed->get<std::string>(), kMismatchFix);
      }
      names_.push_back(name);
      shard_of_.emplace(name, shards_.size() - 1);
    }
  }
}

const SafetensorsFile& SafetensorsCheckpoint::file(const std::string& name) const {
  const auto it = shard_of_.find(name);
  if (it == shard_of_.end()) {
    fail_user("checkpoint {} has no tensor \"{}\"{}. Check the name, or that this checkpoint belongs to this model.",
              path_, name, did_you_mean(name, names_));
  }
  return shards_[it->second];
}

// ---- writers -------------------------------------------------------------------------------------

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  check_tensors(path, tensors);
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::ranges::sort(order, [&](size_t a, size_t b) {
    const size_t ra = dtype_rank(tensors[a].second.scalar_type()), rb = dtype_rank(tensors[b].second.scalar_type());
    return ra != rb ? ra > rb : tensors[a].first < tensors[b].first;
  });

  // Compact JSON in serde_json's form: "__metadata__" first (omitted when empty), then the tensors
  // in layout order, padded with spaces to a multiple of 8 bytes.
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (const auto& [key, value] : metadata) {
      if (header.back() != '{') header += ',';
      header += json_string(key, path, "metadata key") + ":" + json_string(value, path, "metadata value");
    }
    header += '}';
  }
  int64_t offset = 0;
  for (size_t i : order) {
    const auto& [name, t] = tensors[i];
    if (header.size() > 1) header += ',';
    header += fmt::format("{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                          json_string(name, path, "tensor name"), kSafetensorsDTypes[dtype_rank(t.scalar_type())].name,
                          fmt::join(t.sizes().begin(), t.sizes().end(), ","), offset, offset + nbytes(t));
    offset += nbytes(t);
  }
  header += '}';
  header.append((8 - header.size() % 8) % 8, ' ');

  create_parent(path);
  DurableFile out(path);
  const uint64_t header_len = header.size();
  out.write(&header_len, 8);
  out.write(header.data(), header.size());
  for (size_t i : order) {
    // One tensor at a time on the host, so saving GPU tensors never holds a second full copy.
    const torch::Tensor t = tensors[i].second.cpu().resolve_conj().resolve_neg().contiguous();
    out.write(t.data_ptr(), static_cast<size_t>(nbytes(t)));
  }
  out.commit();
}

void save_safetensors_checkpoint(const std::string& dir, const NamedTensors& tensors, int64_t max_shard_bytes) {
  if (max_shard_bytes <= 0) fail_user("cannot write checkpoint {}: max_shard_bytes is {}; it must be positive.", dir, max_shard_bytes);
  check_tensors(dir, tensors);  // here too: a name repeated across two shards would escape each shard's check
  // huggingface_hub's split_torch_state_dict_into_shards, step for step: a tensor larger than a
  // shard gets a shard of its own at once; otherwise the current shard closes when the tensor would
  // overflow it.
  std::vector<std::vector<size_t>> shards;
  std::vector<size_t> current;
  int64_t current_bytes = 0, total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t bytes = nbytes(tensors[i].second);
    total_bytes += bytes;
    if (bytes > max_shard_bytes) {
      shards.push_back({i});
      continue;
    }
    if (current_bytes + bytes > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(i);
    current_bytes += bytes;
  }
  if (!current.empty()) shards.push_back(std::move(current));

  const fs::path root(dir);
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  std::set<std::string> written;
  if (shards.size() <= 1) {
    save_safetensors((root / files::kSafetensors).string(), tensors, metadata);
    written.insert(files::kSafetensors);
  } else {
    json weight_map = json::object();
    for (size_t s = 0; s < shards.size(); ++s) {
      const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
      NamedTensors shard;
      for (size_t i : shards[s]) {
        shard.push_back(tensors[i]);
        weight_map[tensors[i].first] = file;
      }
      save_safetensors((root / file).string(), shard, metadata);
      written.insert(file);
    }
    // As transformers writes it: sorted keys, indent 2, a final newline.
    const json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    const std::string text = index.dump(2) + "\n";
    write_file_durably(root / files::kSafetensorsIndex, text);
    written.insert(files::kSafetensorsIndex);
  }

  // Remove what an earlier checkpoint left here (the index first, so no index names a missing
  // shard); a stale index or single file next to the new one would make loading ambiguous.
  static const std::regex kShard(R"(model-\d{5}-of-\d{5}\.safetensors)");
  for (const char* name : {files::kSafetensorsIndex, files::kSafetensors}) {
    if (!written.contains(name)) fs::remove(root / name);
  }
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, kShard) && !written.contains(name)) fs::remove(entry.path());
  }
}

}  // namespace moeforge
