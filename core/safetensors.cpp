#include "core/safetensors.h"

#include "core/durable_file.h"
#include "core/errors.h"
#include "core/text_distance.h"

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

struct DType {
  std::string_view name;
  torch::ScalarType type;
};

// In the order of the safetensors crate's `Dtype` enum: its writer lays tensors out by this order,
// last first, then by name, and following it makes our files byte-identical to Python's. (That
// order puts wider types first, so every tensor's data is aligned to its element size.)
constexpr std::array<DType, 19> kDTypes = {{
    {"BOOL", torch::ScalarType::Bool},
    {"U8", torch::ScalarType::Byte},
    {"I8", torch::ScalarType::Char},
    {"F8_E5M2", torch::ScalarType::Float8_e5m2},
    {"F8_E4M3", torch::ScalarType::Float8_e4m3fn},
    {"F8_E8M0", torch::ScalarType::Float8_e8m0fnu},
    {"F8_E4M3FNUZ", torch::ScalarType::Float8_e4m3fnuz},
    {"F8_E5M2FNUZ", torch::ScalarType::Float8_e5m2fnuz},
    {"I16", torch::ScalarType::Short},
    {"U16", torch::ScalarType::UInt16},
    {"F16", torch::ScalarType::Half},
    {"BF16", torch::ScalarType::BFloat16},
    {"I32", torch::ScalarType::Int},
    {"U32", torch::ScalarType::UInt32},
    {"F32", torch::ScalarType::Float},
    {"C64", torch::ScalarType::ComplexFloat},
    {"F64", torch::ScalarType::Double},
    {"I64", torch::ScalarType::Long},
    {"U64", torch::ScalarType::UInt64},
}};
// Valid safetensors dtypes with sub-byte elements, which LibTorch has no unpacked type for.
constexpr std::array<std::string_view, 3> kSubByteDTypes = {"F4", "F6_E2M3", "F6_E3M2"};

// The safetensors crate refuses larger headers; a larger length field means a file of another kind.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

constexpr const char* kCorruptFix = "The file is corrupt or was written by a broken tool; re-save or re-download it.";

std::string dtype_list() {
  std::string out;
  for (const auto& d : kDTypes) out += (out.empty() ? "" : ", ") + std::string(d.name);
  return out;
}

const DType* find_dtype(std::string_view name) {
  const auto it = std::ranges::find(kDTypes, name, &DType::name);
  return it == kDTypes.end() ? nullptr : &*it;
}

size_t dtype_rank(torch::ScalarType type) {
  return static_cast<size_t>(std::ranges::find(kDTypes, type, &DType::type) - kDTypes.begin());
}

// A JSON value for an error message, cut short.
std::string show(const json& v) {
  std::string s = v.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

// A JSON integer >= 0 (nlohmann parses every non-negative integer as unsigned).
std::optional<uint64_t> as_size(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  return std::nullopt;
}

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
    if (dtype_rank(t.scalar_type()) == kDTypes.size()) {
      fail_user("cannot write {}: tensor \"{}\" has dtype {}, which safetensors cannot store; convert it to one of {}.",
                path, name, c10::toString(t.scalar_type()), dtype_list());
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

  uint64_t header_len = 0;
  std::memcpy(&header_len, map_.get(), 8);
  if (header_len > size - 8) {
    fail_user("{}: the header length (first 8 bytes, little-endian) is {}, but only {} bytes follow it. The file is "
              "truncated, or not a safetensors file (a PyTorch .bin/.pt checkpoint is a zip archive).",
              path, header_len, size - 8);
  }
  if (header_len > kMaxHeaderBytes) {
    fail_user("{}: the header length is {} bytes, above the format's limit of {}. This is not a safetensors file.",
              path, header_len, kMaxHeaderBytes);
  }
  const auto* text = reinterpret_cast<const char*>(map_.get()) + 8;
  data_ = map_.get() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  // nlohmann keeps the last of duplicate keys silently; a duplicated tensor name is an error.
  std::set<std::string> keys;
  const json::parser_callback_t no_duplicates = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && !keys.insert(parsed.get<std::string>()).second) {
      fail_user("{}: the header names \"{}\" twice. {}", path, parsed.get<std::string>(), kCorruptFix);
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text, text + header_len, no_duplicates);
  } catch (const json::parse_error& e) {
    fail_user("{}: the header (bytes 8 to {}) is not valid UTF-8 JSON: {}. {}", path, 8 + header_len, e.what(),
              kCorruptFix);
  }
  if (!header.is_object()) {
    fail_user("{}: the header is a JSON {}, but must be an object mapping tensor names to {{\"dtype\", \"shape\", "
              "\"data_offsets\"}}. {}",
              path, header.type_name(), kCorruptFix);
  }

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail_user("{}: \"__metadata__\" is {}, but must be an object of strings. {}", path, show(entry), kCorruptFix);
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          fail_user("{}: \"__metadata__\" entry \"{}\" is {}, but metadata values must be strings. {}", path, key,
                    show(value), kCorruptFix);
        }
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const auto bad = [&](const std::string& what) {
      return UserError(fmt::format("{}: tensor \"{}\": {}. {}", path, name, what, kCorruptFix));
    };
    if (!entry.is_object()) throw bad(fmt::format("expected an object {{\"dtype\", \"shape\", \"data_offsets\"}}, got {}", show(entry)));
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(field)) throw bad(fmt::format("\"{}\" is missing; every tensor needs dtype, shape and data_offsets", field));
    }
    Info info;
    const json& dtype = entry.at("dtype");
    if (!dtype.is_string()) throw bad(fmt::format("\"dtype\" is {}, expected a string such as \"BF16\"", show(dtype)));
    info.dtype = dtype.get<std::string>();
    const DType* dt = find_dtype(info.dtype);
    if (!dt && std::ranges::find(kSubByteDTypes, info.dtype) != kSubByteDTypes.end()) {
      fail_user("{}: tensor \"{}\" has the sub-byte dtype {}, which moeforge cannot load (LibTorch has no unpacked "
                "type for it). Convert the checkpoint to BF16 or F32.",
                path, name, info.dtype);
    }
    if (!dt) throw bad(fmt::format("unknown dtype \"{}\"; expected one of {}", info.dtype, dtype_list()));
    info.scalar_type = dt->type;

    const json& shape = entry.at("shape");
    if (!shape.is_array()) throw bad(fmt::format("\"shape\" is {}, expected a list of non-negative integers", show(shape)));
    uint64_t numel = 1;
    bool overflow = false;
    for (const json& dim : shape) {
      const auto d = as_size(dim);
      if (!d || *d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw bad(fmt::format("shape {} has the dimension {}; dimensions must be non-negative integers", show(shape), show(dim)));
      }
      info.shape.push_back(static_cast<int64_t>(*d));
      overflow |= __builtin_mul_overflow(numel, *d, &numel);
    }

    const json& offsets = entry.at("data_offsets");
    const auto begin = offsets.is_array() && offsets.size() == 2 ? as_size(offsets[0]) : std::nullopt;
    const auto end = offsets.is_array() && offsets.size() == 2 ? as_size(offsets[1]) : std::nullopt;
    if (!begin || !end) throw bad(fmt::format("\"data_offsets\" is {}, expected [begin, end] of non-negative integers", show(offsets)));
    if (*end < *begin) throw bad(fmt::format("data_offsets [{}, {}] end before they begin", *begin, *end));
    if (*end > data_size) {
      throw bad(fmt::format("data_offsets [{}, {}] run past the data section, which has {} bytes (the file is {} bytes)",
                      *begin, *end, data_size, size));
    }
    uint64_t expected = 0;
    overflow |= __builtin_mul_overflow(numel, c10::elementSize(info.scalar_type), &expected);
    if (overflow || expected != *end - *begin) {
      throw bad(fmt::format("shape {} of {} needs {} bytes, but data_offsets [{}, {}] span {}", show(shape), info.dtype,
                      overflow ? std::string("more than 2^64") : std::to_string(expected), *begin, *end, *end - *begin));
    }
    info.begin = *begin;
    info.end = *end;
    names_.push_back(name);
    infos_.emplace(name, std::move(info));
  }

  // The format requires the tensors to tile the data section exactly: no overlaps, no holes.
  std::ranges::sort(names_, [&](const std::string& a, const std::string& b) {
    const Info &x = infos_.at(a), &y = infos_.at(b);
    return std::tie(x.begin, x.end, a) < std::tie(y.begin, y.end, b);
  });
  size_t covered = 0;
  const std::string* previous = nullptr;
  for (const auto& name : names_) {
    const Info& i = infos_.at(name);
    if (i.begin < covered) {
      fail_user("{}: tensor \"{}\" (bytes [{}, {})) overlaps tensor \"{}\" (bytes [{}, {})); each tensor needs its own "
                "bytes. {}",
                path, name, i.begin, i.end, *previous, infos_.at(*previous).begin, covered, kCorruptFix);
    }
    if (i.begin > covered) {
      fail_user("{}: bytes [{}, {}) of the data section belong to no tensor (a hole before tensor \"{}\"); the format "
                "requires the data to be packed. {}",
                path, covered, i.begin, name, kCorruptFix);
    }
    covered = i.end;
    previous = &name;
  }
  if (covered != data_size) {
    fail_user("{}: the tensors cover {} bytes, but the data section has {}; the last {} bytes belong to no tensor. {}",
              path, covered, data_size, data_size - covered, kCorruptFix);
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
  } catch (const json::parse_error& e) {
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
    if (!file.is_string()) fail_user("{}: \"weight_map\" maps \"{}\" to {}, expected a shard file name.", index_path, name, show(file));
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
                          json_string(name, path, "tensor name"), kDTypes[dtype_rank(t.scalar_type())].name,
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
