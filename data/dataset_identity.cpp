#include "data/dataset_identity.h"

#include "core/base/errors.h"
#include "core/base/hash64.h"
#include "data/blend.h"
#include "data/indexed_dataset.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

namespace fs = std::filesystem;

namespace moeforge::data {

namespace {

struct FileDigest {
  int64_t bytes = 0;
  uint64_t hash = 0;
};

FileDigest digest_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_user("{}: cannot be read ({})", path, std::strerror(errno));
  std::vector<std::byte> buffer(size_t{4} << 20);
  FileDigest d;
  Hash64 h;
  while (true) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int error = errno;
      ::close(fd);
      fail_user("{}: cannot be read ({})", path, std::strerror(error));
    }
    if (n == 0) break;
    h.update(std::span(buffer.data(), static_cast<size_t>(n)));
    d.bytes += n;
  }
  ::close(fd);
  d.hash = h.digest();
  return d;
}

int64_t file_bytes(const std::string& path) {
  std::error_code ec;
  const auto bytes = fs::file_size(path, ec);
  if (ec) fail_user("{}: cannot be read ({})", path, ec.message());
  return static_cast<int64_t>(bytes);
}

}  // namespace

std::vector<DatasetIdentity> identify_datasets(const std::vector<std::string>& data_path) {
  std::vector<DatasetIdentity> out;
  if (data_path.empty()) return out;
  for (const auto& prefix : parse_blend(data_path).prefixes) {
    const bool seen = std::any_of(out.begin(), out.end(), [&](const DatasetIdentity& d) { return d.prefix == prefix; });
    if (seen) continue;
    const FileDigest idx = digest_file(idx_path(prefix));
    out.push_back({prefix, idx.bytes, idx.hash, file_bytes(bin_path(prefix))});
  }
  return out;
}

std::vector<std::string> dataset_changes(const std::vector<DatasetIdentity>& recorded, const std::vector<DatasetIdentity>& now) {
  auto prefixes = [](const std::vector<DatasetIdentity>& v) {
    std::vector<std::string> p;
    for (const auto& d : v) p.push_back(d.prefix);
    return fmt::format("{}", fmt::join(p, ", "));
  };
  if (recorded.size() != now.size()) {
    return {fmt::format("the checkpoint records {} dataset(s) ({}), data.data_path names {} ({})", recorded.size(),
                        prefixes(recorded), now.size(), prefixes(now))};
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < now.size(); ++i) {
    const DatasetIdentity &was = recorded[i], &is = now[i];
    const std::string moved = was.prefix == is.prefix ? "" : fmt::format(" (the checkpoint's was {})", was.prefix);
    if (was.idx_bytes != is.idx_bytes) {
      out.push_back(fmt::format("{}: its size changed from {} to {} bytes{}", idx_path(is.prefix), was.idx_bytes,
                                is.idx_bytes, moved));
    } else if (was.idx_hash != is.idx_hash) {
      out.push_back(fmt::format("{}: its contents changed (same {} bytes, hash {:016x}, now {:016x}){}", idx_path(is.prefix),
                                is.idx_bytes, was.idx_hash, is.idx_hash, moved));
    }
    if (was.bin_bytes != is.bin_bytes) {
      out.push_back(fmt::format("{}: its size changed from {} to {} bytes{}", bin_path(is.prefix), was.bin_bytes,
                                is.bin_bytes, moved));
    }
  }
  return out;
}

}  // namespace moeforge::data
