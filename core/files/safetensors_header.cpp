#include "core/files/safetensors_header.h"

#include "core/base/errors.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <set>
#include <tuple>

namespace moeforge {

namespace {

using nlohmann::json;

// Valid safetensors dtypes with sub-byte elements, which LibTorch has no unpacked type for.
constexpr std::array<std::string_view, 3> kSubByteDTypes = {"F4", "F6_E2M3", "F6_E3M2"};

// The safetensors crate refuses larger headers; a larger length field means a file of another kind.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

constexpr const char* kCorruptFix = "The file is corrupt or was written by a broken tool; re-save or re-download it.";


// A JSON integer >= 0 (nlohmann parses every non-negative integer as unsigned).
std::optional<uint64_t> as_size(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  return std::nullopt;
}

}  // namespace

std::string safetensors_dtype_names() {
  std::string out;
  for (const auto& d : kSafetensorsDTypes) out += (out.empty() ? "" : ", ") + std::string(d.name);
  return out;
}

std::string shorten_for_message(std::string text) { return text.size() > 80 ? text.substr(0, 77) + "..." : text; }

std::string show_json(const json& value) { return shorten_for_message(value.dump()); }

SafetensorsHeader parse_safetensors_header(const std::byte* file, size_t size, const std::string& path) {
  if (size < 8) {
    fail_user("{}: {} bytes, but a safetensors file starts with an 8-byte header length. The file is truncated or "
              "not a safetensors file.",
              path, size);
  }
  SafetensorsHeader h;
  uint64_t header_len = 0;
  std::memcpy(&header_len, file, 8);
  if (header_len > size - 8) {
    fail_user("{}: the header length (first 8 bytes, little-endian) is {}, but only {} bytes follow it. The file is "
              "truncated, or not a safetensors file (a PyTorch .bin/.pt checkpoint is a zip archive).",
              path, header_len, size - 8);
  }
  if (header_len > kMaxHeaderBytes) {
    fail_user("{}: the header length is {} bytes, above the format's limit of {}. This is not a safetensors file.",
              path, header_len, kMaxHeaderBytes);
  }
  const auto* text = reinterpret_cast<const char*>(file) + 8;
  h.data_offset = 8 + header_len;
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
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number such as 9E777
    fail_user("{}: the header (bytes 8 to {}) is not valid UTF-8 JSON: {}. {}", path, 8 + header_len, e.what(),
              kCorruptFix);
  }
  if (!header.is_object()) {
    fail_user("{}: the header is a JSON {}, but must be an object mapping tensor names to {{\"dtype\", \"shape\", "
              "\"data_offsets\"}}. {}",
              path, header.type_name(), kCorruptFix);
  }

  for (const auto& item : header.items()) {
    const std::string& name = item.key();  // not a structured binding: the lambda below captures it
    const json& entry = item.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) fail_user("{}: \"__metadata__\" is {}, but must be an object of strings. {}", path, show_json(entry), kCorruptFix);
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          fail_user("{}: \"__metadata__\" entry \"{}\" is {}, but metadata values must be strings. {}", path, key,
                    show_json(value), kCorruptFix);
        }
        h.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    const auto bad = [&](const std::string& what) {
      return UserError(fmt::format("{}: tensor \"{}\": {}. {}", path, name, what, kCorruptFix));
    };
    if (!entry.is_object()) throw bad(fmt::format("expected an object {{\"dtype\", \"shape\", \"data_offsets\"}}, got {}", show_json(entry)));
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(field)) throw bad(fmt::format("\"{}\" is missing; every tensor needs dtype, shape and data_offsets", field));
    }
    SafetensorsHeader::Entry info;
    const json& dtype = entry.at("dtype");
    if (!dtype.is_string()) throw bad(fmt::format("\"dtype\" is {}, expected a string such as \"BF16\"", show_json(dtype)));
    info.dtype = dtype.get<std::string>();
    const auto dt = std::ranges::find(kSafetensorsDTypes, std::string_view(info.dtype), &SafetensorsDType::name);
    const bool known = dt != kSafetensorsDTypes.end();
    if (!known && std::ranges::find(kSubByteDTypes, info.dtype) != kSubByteDTypes.end()) {
      fail_user("{}: tensor \"{}\" has the sub-byte dtype {}, which moeforge cannot load (LibTorch has no unpacked "
                "type for it). Convert the checkpoint to BF16 or F32.",
                path, name, info.dtype);
    }
    if (!known) throw bad(fmt::format("unknown dtype \"{}\"; expected one of {}", info.dtype, safetensors_dtype_names()));
    info.dtype_index = static_cast<size_t>(dt - kSafetensorsDTypes.begin());

    const json& shape = entry.at("shape");
    if (!shape.is_array()) throw bad(fmt::format("\"shape\" is {}, expected a list of non-negative integers", show_json(shape)));
    uint64_t numel = 1;
    bool overflow = false;
    for (const json& dim : shape) {
      const auto d = as_size(dim);
      if (!d || *d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw bad(fmt::format("shape {} has the dimension {}; dimensions must be non-negative integers", show_json(shape), show_json(dim)));
      }
      info.shape.push_back(static_cast<int64_t>(*d));
      overflow |= __builtin_mul_overflow(numel, *d, &numel);
    }

    const json& offsets = entry.at("data_offsets");
    const auto begin = offsets.is_array() && offsets.size() == 2 ? as_size(offsets[0]) : std::nullopt;
    const auto end = offsets.is_array() && offsets.size() == 2 ? as_size(offsets[1]) : std::nullopt;
    if (!begin || !end) throw bad(fmt::format("\"data_offsets\" is {}, expected [begin, end] of non-negative integers", show_json(offsets)));
    if (*end < *begin) throw bad(fmt::format("data_offsets [{}, {}] end before they begin", *begin, *end));
    if (*end > data_size) {
      throw bad(fmt::format("data_offsets [{}, {}] run past the data section, which has {} bytes (the file is {} bytes)",
                      *begin, *end, data_size, size));
    }
    uint64_t expected = 0;
    overflow |= __builtin_mul_overflow(numel, dt->bytes, &expected);
    if (overflow || expected != *end - *begin) {
      throw bad(fmt::format("shape {} of {} needs {} bytes, but data_offsets [{}, {}] span {}", show_json(shape), info.dtype,
                      overflow ? std::string("more than 2^64") : std::to_string(expected), *begin, *end, *end - *begin));
    }
    info.begin = *begin;
    info.end = *end;
    h.names.push_back(name);
    h.entries.emplace(name, std::move(info));
  }

  // The format requires the tensors to tile the data section exactly: no overlaps, no holes.
  std::ranges::sort(h.names, [&](const std::string& a, const std::string& b) {
    const auto &x = h.entries.at(a), &y = h.entries.at(b);
    return std::tie(x.begin, x.end, a) < std::tie(y.begin, y.end, b);
  });
  size_t covered = 0;
  const std::string* previous = nullptr;
  for (const auto& name : h.names) {
    const auto& i = h.entries.at(name);
    if (i.begin < covered) {
      fail_user("{}: tensor \"{}\" (bytes [{}, {})) overlaps tensor \"{}\" (bytes [{}, {})); each tensor needs its own "
                "bytes. {}",
                path, name, i.begin, i.end, *previous, h.entries.at(*previous).begin, covered, kCorruptFix);
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
  return h;
}

}  // namespace moeforge
