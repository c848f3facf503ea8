// Indexed datasets against Megatron-Core's own writer and reader (tests/oracles), and every class
// of corruption a reader must catch.
#include "core/base/errors.h"
#include "core/base/hash64.h"
#include "data/dataset_identity.h"
#include "data/indexed_dataset.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <tuple>

using namespace moeforge;
using namespace moeforge::data;
using Catch::Matchers::Contains;

namespace {

using Documents = std::vector<std::vector<std::vector<int64_t>>>;  // documents of sequences of ids

Documents random_documents(uint32_t seed, int64_t max_id, int count) {
  std::mt19937 rng(seed);
  Documents docs;
  for (int d = 0; d < count; ++d) {
    std::vector<std::vector<int64_t>> doc;
    const int sequences = 1 + static_cast<int>(rng() % 3);
    for (int s = 0; s < sequences; ++s) {
      std::vector<int64_t> seq(rng() % 40);  // empty sequences included
      for (auto& t : seq) t = static_cast<int64_t>(rng() % static_cast<uint32_t>(max_id));
      doc.push_back(seq);
    }
    docs.push_back(doc);
  }
  return docs;
}


void write_ours(const std::string& prefix, TokenDType dtype, const Documents& docs) {
  IndexedDatasetBuilder b(prefix, dtype);
  for (const auto& doc : docs) {
    for (const auto& seq : doc) b.add_item(seq);
    b.end_document();
  }
  b.finalize();
}

void write_megatron(const test::TempDir& dir, const std::string& prefix, const char* dtype, const Documents& docs) {
  const auto json = dir.file(std::string("docs-") + dtype + ".json", nlohmann::json(docs).dump());
  test::run_oracle("megatron_data_oracle.py", "write " + prefix + " " + dtype + " " + json);
}

void patch(const std::string& path, size_t offset, const void* bytes, size_t n) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(static_cast<const char*>(bytes), static_cast<std::streamsize>(n));
}

std::string open_error(const std::string& prefix) {
  return test::user_error([&] { IndexedDataset d(prefix); });
}

}  // namespace

TEST_CASE("our files are byte-identical to Megatron's for all eight dtypes", "[data][indexed]") {
  test::TempDir dir;
  const std::vector<std::pair<TokenDType, const char*>> dtypes = {
      {TokenDType::uint8, "uint8"},   {TokenDType::int8, "int8"},       {TokenDType::int16, "int16"},
      {TokenDType::int32, "int32"},   {TokenDType::int64, "int64"},     {TokenDType::float64, "float64"},
      {TokenDType::float32, "float32"}, {TokenDType::uint16, "uint16"}};
  for (const auto& [dtype, name] : dtypes) {
    INFO(name);
    const auto docs = random_documents(7, dtype == TokenDType::int8 ? 127 : 255, 25);
    const std::string ours = (dir.path() / (std::string("ours_") + name)).string();
    const std::string theirs = (dir.path() / (std::string("megatron_") + name)).string();
    write_ours(ours, dtype, docs);
    write_megatron(dir, theirs, name, docs);
    CHECK(test::slurp(bin_path(ours)) == test::slurp(bin_path(theirs)));
    CHECK(test::slurp(idx_path(ours)) == test::slurp(idx_path(theirs)));

    // Reading Megatron's file gives back the documents.
    const IndexedDataset d(theirs);
    CHECK(d.dtype() == dtype);
    CHECK(d.num_documents() == 25);
    int64_t i = 0;
    for (size_t doc = 0; doc < docs.size(); ++doc) {
      CHECK(d.document_index()[doc] == i);
      for (const auto& seq : docs[doc]) {
        std::vector<int64_t> got(seq.size());
        d.read(i, 0, static_cast<int64_t>(seq.size()), got.data());
        CHECK(got == seq);
        ++i;
      }
    }
  }
}

TEST_CASE("merging equals Megatron's add_index", "[data][indexed]") {
  test::TempDir dir;
  const auto a = (dir.path() / "a").string(), b = (dir.path() / "b").string();
  write_ours(a, TokenDType::int32, random_documents(1, 100000, 10));
  write_ours(b, TokenDType::int32, random_documents(2, 100000, 7));
  const auto ours = (dir.path() / "merged").string(), theirs = (dir.path() / "megatron_merged").string();
  IndexedDatasetBuilder m(ours, TokenDType::int32);
  m.add_index(a);
  m.add_index(b);
  m.finalize();
  test::run_oracle("megatron_data_oracle.py", "merge " + theirs + " " + a + " " + b);
  CHECK(test::slurp(bin_path(ours)) == test::slurp(bin_path(theirs)));
  CHECK(test::slurp(idx_path(ours)) == test::slurp(idx_path(theirs)));
  IndexedDatasetBuilder wrong((dir.path() / "x").string(), TokenDType::uint16);
  CHECK_THROWS_WITH(wrong.add_index(a), Contains("same dtype"));
}

TEST_CASE("Megatron's dtype choice by vocabulary size", "[data][indexed]") {
  CHECK(optimal_dtype(32000) == TokenDType::uint16);
  CHECK(optimal_dtype(65499) == TokenDType::uint16);
  CHECK(optimal_dtype(65500) == TokenDType::int32);
  CHECK(optimal_dtype(151936) == TokenDType::int32);
}

TEST_CASE("the token-id scan finds the smallest and largest id of every integer dtype, wherever they lie",
          "[data][indexed]") {
  test::TempDir dir;
  const std::vector<std::tuple<TokenDType, int64_t, int64_t>> dtypes = {
      {TokenDType::uint8, 0, 255},          {TokenDType::int8, -128, 127},
      {TokenDType::int16, -32768, 32767},   {TokenDType::uint16, 0, 65535},
      {TokenDType::int32, -(int64_t{1} << 31), (int64_t{1} << 31) - 1},
      {TokenDType::int64, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()}};
  std::mt19937_64 rng(5);
  for (const auto& [dtype, lowest, highest] : dtypes) {
    INFO(dtype_name(dtype));
    // More tokens than one block of the scan (64 KiB), not a multiple of it; the extremes in the last
    // (short) block and in a sequence of its own.
    std::vector<std::vector<int64_t>> sequences(7, std::vector<int64_t>(14287));
    for (auto& seq : sequences) {
      for (auto& t : seq) t = lowest / 4 + static_cast<int64_t>(rng() % static_cast<uint64_t>(highest / 4 - lowest / 4 + 1));
    }
    sequences[3][100] = lowest == 0 ? 0 : lowest + 1;
    sequences.back().back() = highest - 1;
    int64_t expected_min = std::numeric_limits<int64_t>::max(), expected_max = std::numeric_limits<int64_t>::min();
    IndexedDatasetBuilder b((dir.path() / dtype_name(dtype)).string(), dtype);
    for (const auto& seq : sequences) {
      b.add_document(seq);
      for (auto t : seq) {
        expected_min = std::min(expected_min, t);
        expected_max = std::max(expected_max, t);
      }
    }
    b.finalize();
    const auto range = IndexedDataset((dir.path() / dtype_name(dtype)).string()).token_id_range();
    CHECK(range.min == expected_min);
    CHECK(range.max == expected_max);
    CHECK(range.max == highest - 1);
  }
  IndexedDatasetBuilder empty((dir.path() / "empty").string(), TokenDType::int32);
  empty.finalize();
  CHECK(IndexedDataset((dir.path() / "empty").string()).token_id_range().empty());
  CHECK(unsigned_dtype_max(TokenDType::uint8) == 255);
  CHECK(unsigned_dtype_max(TokenDType::uint16) == 65535);
  CHECK_FALSE(unsigned_dtype_max(TokenDType::int16));
  CHECK_FALSE(unsigned_dtype_max(TokenDType::int32));
}

TEST_CASE("an unfinished build leaves no dataset under the final name", "[data][indexed]") {
  test::TempDir dir;
  const auto prefix = (dir.path() / "partial").string();
  {
    IndexedDatasetBuilder b(prefix, TokenDType::uint16);
    b.add_document(std::vector<int64_t>{1, 2, 3});
  }
  CHECK_FALSE(std::filesystem::exists(bin_path(prefix)));
  CHECK_FALSE(std::filesystem::exists(idx_path(prefix)));
  CHECK_FALSE(std::filesystem::exists(bin_path(prefix) + ".tmp"));
  IndexedDatasetBuilder b(prefix, TokenDType::uint16);
  CHECK_THROWS_WITH(b.add_item(std::vector<int64_t>{70000}), Contains("does not fit the dataset dtype uint16"));
}

TEST_CASE("every corruption of the index is reported with file and offset", "[data][indexed][errors]") {
  test::TempDir dir;
  const auto docs = random_documents(3, 1000, 5);
  int n = 0;
  for (const auto& d : docs) n += static_cast<int>(d.size());
  const size_t N = static_cast<size_t>(n);
  auto fresh = [&](const std::string& name) {
    const auto prefix = (dir.path() / name).string();
    write_ours(prefix, TokenDType::uint16, docs);
    return prefix;
  };
  auto p = fresh("magic");
  patch(idx_path(p), 0, "XX", 2);
  CHECK_THAT(open_error(p), Contains("magic.idx: bad magic at offset 0"));

  p = fresh("version");
  const uint64_t v2 = 2;
  patch(idx_path(p), 9, &v2, 8);
  CHECK_THAT(open_error(p), Contains("offset 9: version 2, expected 1"));

  p = fresh("dtype");
  const uint8_t code = 9;
  patch(idx_path(p), 17, &code, 1);
  CHECK_THAT(open_error(p), Contains("offset 17: dtype code 9"));

  p = fresh("count");
  const uint64_t huge = 1ULL << 40;
  patch(idx_path(p), 18, &huge, 8);
  CHECK_THAT(open_error(p), Contains("header says 1099511627776 sequences"));

  p = fresh("docstart");
  const int64_t one = 1;
  patch(idx_path(p), 34 + 12 * N, &one, 8);
  CHECK_THAT(open_error(p), Contains("document_index[0] is 1"));

  p = fresh("doclast");
  const int64_t last = n + 5;
  patch(idx_path(p), 34 + 12 * N + 8 * docs.size(), &last, 8);
  CHECK_THAT(open_error(p), Contains("the last document_index entry is"));

  p = fresh("docorder");
  const int64_t big = n;
  patch(idx_path(p), 34 + 12 * N + 8, &big, 8);  // entry 1 = N, entry 2 smaller
  CHECK_THAT(open_error(p), Contains("must not decrease"));

  p = fresh("pointer");
  const int64_t off = 3;
  patch(idx_path(p), 34 + 4 * N + 8, &off, 8);
  CHECK_THAT(open_error(p), Contains("sequence 1 starts at byte 3") && Contains("expected"));

  p = fresh("negative");
  const int32_t neg = -4;
  patch(idx_path(p), 34, &neg, 4);
  CHECK_THAT(open_error(p), Contains("sequence 0 has negative length -4"));

  p = fresh("truncbin");
  std::filesystem::resize_file(bin_path(p), 3);
  CHECK_THAT(open_error(p), Contains("truncbin.bin: 3 bytes") && Contains("truncated"));

  p = fresh("truncidx");
  std::filesystem::resize_file(idx_path(p), 20);
  CHECK_THAT(open_error(p), Contains("truncated index: 20 bytes"));

  p = fresh("trailing");
  std::ofstream(idx_path(p), std::ios::app | std::ios::binary) << "xyz";
  CHECK_THAT(open_error(p), Contains("3 unexpected bytes after the document index"));

  p = fresh("nobin");
  std::filesystem::remove(bin_path(p));
  CHECK_THAT(open_error(p), Contains("cannot open") && Contains("nobin.bin"));
  CHECK_THAT(open_error((dir.path() / "absent").string()), Contains("absent.idx") && Contains("data.data_path"));

  // A multimodal file (one mode byte per sequence after the document index) is read.
  p = fresh("multimodal");
  std::ofstream(idx_path(p), std::ios::app | std::ios::binary) << std::string(N, '\1');
  const IndexedDataset mm(p);
  CHECK(mm.multimodal());
  CHECK(mm.sequence_modes().size() == N);
}

TEST_CASE("Hash64 is the same fed whole or in pieces, and tells one changed or added byte", "[data][indexed][hash]") {
  std::vector<std::byte> bytes(1000);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::byte>(i * 7 + 3);
  const uint64_t whole = hash64(bytes);
  for (const size_t piece : {1, 7, 31, 32, 33, 999}) {
    INFO(piece);
    Hash64 h;
    for (size_t at = 0; at < bytes.size(); at += piece) h.update(std::span(bytes).subspan(at, std::min(piece, bytes.size() - at)));
    CHECK(h.digest() == whole);
  }
  auto changed = bytes;
  changed[500] ^= std::byte{1};
  CHECK(hash64(changed) != whole);
  auto longer = bytes;
  longer.push_back(std::byte{0});  // zero padding of the last block is told apart by the length
  CHECK(hash64(longer) != whole);
  CHECK(hash64(std::span(longer).first(1)) != hash64({}));
}

TEST_CASE("a dataset's identity is its index's size and hash and its tokens' size", "[data][indexed][hash]") {
  test::TempDir dir;
  const auto a = (dir.path() / "a").string(), copy = (dir.path() / "copy").string();
  const auto docs = random_documents(7, 1000, 50);
  write_ours(a, TokenDType::uint16, docs);
  write_ours(copy, TokenDType::uint16, docs);
  const auto before = identify_datasets({a});
  REQUIRE(before.size() == 1);
  CHECK(before[0].prefix == a);
  CHECK(before[0].idx_bytes == static_cast<int64_t>(std::filesystem::file_size(a + ".idx")));
  CHECK(before[0].bin_bytes == static_cast<int64_t>(std::filesystem::file_size(a + ".bin")));
  CHECK(identify_datasets({"0.5 " + a + " 0.5 " + a}).size() == 1);  // a prefix blended twice is one dataset
  // The same files under another prefix (a moved copy) are the same dataset.
  CHECK(dataset_changes(before, identify_datasets({copy})).empty());

  auto reordered = docs;
  std::reverse(reordered.begin(), reordered.end());
  write_ours(a, TokenDType::uint16, reordered);
  auto changes = dataset_changes(before, identify_datasets({a}));
  REQUIRE(changes.size() == 1);  // the same tokens: the .bin keeps its size
  CHECK_THAT(changes[0], Contains(a + ".idx: its contents changed"));
  auto more = docs;
  more.push_back(docs[0]);
  write_ours(a, TokenDType::uint16, more);
  changes = dataset_changes(before, identify_datasets({a}));
  REQUIRE(changes.size() == 2);
  CHECK_THAT(changes[0], Contains(a + ".idx: its size changed from " + std::to_string(before[0].idx_bytes)));
  CHECK_THAT(changes[1], Contains(a + ".bin: its size changed"));
  CHECK_THAT(dataset_changes(before, identify_datasets({a, copy}))[0], Contains("records 1 dataset(s)"));
  CHECK_THAT(test::user_error([&] { identify_datasets({(dir.path() / "missing").string()}); }),
             Contains("missing.idx: cannot be read"));
}
