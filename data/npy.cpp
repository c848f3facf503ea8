#include "data/npy.h"

#include "core/files/durable_file.h"
#include "core/base/errors.h"

#include <fmt/format.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>

namespace moeforge::data {

void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape, const void* data,
               size_t bytes) {
  std::string dims;
  for (auto d : shape) dims += fmt::format("{}, ", d);
  if (shape.size() > 1) dims.resize(dims.size() - 2);
  std::string header = fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': ({}), }}", descr, dims);
  // Magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of 64,
  // ending in a newline.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  DurableFile f(path);
  const uint16_t len = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(&len, 2);
  f.write(header);
  f.write(data, bytes);
  f.commit();
}

NpyArray read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail_user("cannot open cached index {}: {}", path, std::strerror(errno));
  char magic[8];
  uint16_t len = 0;
  f.read(magic, 8);
  f.read(reinterpret_cast<char*>(&len), 2);
  if (!f || std::memcmp(magic, "\x93NUMPY\x01\x00", 8) != 0) {
    fail_user("{} is not a version-1.0 .npy file; delete it and the run rebuilds it.", path);
  }
  std::string header(len, '\0');
  f.read(header.data(), len);
  static const std::regex descr_re(R"('descr':\s*'([^']+)')");
  static const std::regex shape_re(R"('shape':\s*\(([^)]*)\))");
  std::smatch m;
  NpyArray a;
  if (!std::regex_search(header, m, descr_re)) fail_user("{}: .npy header without descr; delete the file.", path);
  a.descr = m[1];
  if (!std::regex_search(header, m, shape_re)) fail_user("{}: .npy header without shape; delete the file.", path);
  const std::string dims = m[1];
  int64_t count = 1;
  static const std::regex number(R"(\d+)");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), number); it != std::sregex_iterator(); ++it) {
    a.shape.push_back(std::stoll(it->str()));
    count *= a.shape.back();
  }
  const size_t item = static_cast<size_t>(a.descr.back() - '0');
  a.data.resize(static_cast<size_t>(count) * item);
  f.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(a.data.size()));
  if (!f) fail_user("{}: truncated .npy file; delete it and the run rebuilds it.", path);
  return a;
}

}  // namespace moeforge::data
