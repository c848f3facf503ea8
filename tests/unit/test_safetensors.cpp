// Safetensors files and checkpoints against Python's `safetensors` and Hugging Face's sharding
// (tests/oracles/safetensors_oracle.py), and every class of malformed file a reader must reject.
#include "core/base/errors.h"
#include "core/files/safetensors.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>

using namespace moeforge;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

// A tensor as the oracle sees it: values flat in C order.
struct Spec {
  std::string name, dtype;
  std::vector<int64_t> shape;
  json values;
};

const std::map<std::string, torch::ScalarType> kTypes = {
    {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16},
    {"BF16", torch::kBFloat16}, {"F8_E4M3", torch::kFloat8_e4m3fn}, {"F8_E5M2", torch::kFloat8_e5m2},
    {"I64", torch::kInt64}, {"I32", torch::kInt32}, {"I16", torch::kInt16},
    {"I8", torch::kInt8}, {"U32", torch::kUInt32}, {"U16", torch::kUInt16},
    {"U8", torch::kUInt8}, {"BOOL", torch::kBool}};

// Values exact in every dtype they are given for, so Python and C++ build identical tensors.
Spec spec(const std::string& name, const std::string& dtype, std::vector<int64_t> shape, int64_t seed) {
  int64_t numel = 1;
  for (auto d : shape) numel *= d;
  json values = json::array();
  for (int64_t k = 0; k < numel; ++k) {
    const int64_t r = (k * 7 + seed) % 17;
    if (dtype == "BOOL") values.push_back(r % 3 == 0);
    else if (dtype[0] == 'F' || dtype == "BF16") values.push_back(static_cast<double>(r - 8) * 0.25);
    else if (dtype == "I64") values.push_back((int64_t{1} << 40) * (r - 8) + k);
    else if (dtype == "U32") values.push_back(int64_t{4000000000} - r);
    else if (dtype == "U16") values.push_back(65535 - r);
    else if (dtype == "U8") values.push_back(255 - r);
    else values.push_back(r * 7 - 60);  // fits I8
  }
  return {name, dtype, std::move(shape), std::move(values)};
}

// Every dtype, scalars, empty tensors, names whose sorted order differs from this order.
std::vector<Spec> sample_specs() {
  return {spec("model.layers.10.w", "F32", {3, 5, 7}, 1), spec("model.layers.2.w", "F32", {4}, 2),
          spec("a.bf16", "BF16", {2, 3}, 3),       spec("f16", "F16", {5}, 4),
          spec("f64", "F64", {2, 2}, 5),           spec("i64", "I64", {3}, 6),
          spec("i32", "I32", {4}, 7),              spec("i16", "I16", {3}, 8),
          spec("i8", "I8", {5}, 9),                spec("u8", "U8", {6}, 10),
          spec("u16", "U16", {3}, 11),             spec("u32", "U32", {2}, 12),
          spec("flag", "BOOL", {2, 5}, 13),        spec("fp8.e4m3", "F8_E4M3", {4}, 14),
          spec("fp8.e5m2", "F8_E5M2", {4}, 15),    spec("scalar.bf16", "BF16", {}, 16),
          spec("scalar.i64", "I64", {}, 17),       spec("empty", "F32", {0}, 18),
          spec("empty.3d", "BF16", {2, 0, 3}, 19)};
}

torch::Tensor make(const Spec& s) {
  const auto dtype = kTypes.at(s.dtype);
  torch::Tensor flat;
  if (torch::isFloatingType(dtype)) {
    flat = torch::tensor(s.values.get<std::vector<double>>(), torch::kFloat64);
  } else {
    std::vector<int64_t> ints;
    for (const auto& v : s.values) ints.push_back(v.is_boolean() ? int64_t{v.get<bool>()} : v.get<int64_t>());
    flat = torch::tensor(ints, torch::kInt64);
  }
  return flat.to(dtype).reshape(s.shape);
}

NamedTensors make_all(const std::vector<Spec>& specs) {
  NamedTensors out;
  for (const auto& s : specs) out.emplace_back(s.name, make(s));
  return out;
}

// The oracle's description of a tensor: {"dtype", "shape", "values"}.
json describe(const std::string& dtype, const torch::Tensor& t) {
  const torch::Tensor flat = t.reshape(-1);
  json values = json::array();
  if (t.scalar_type() == torch::kBool) {
    for (int64_t i = 0; i < flat.numel(); ++i) values.push_back(flat[i].item<bool>());
  } else if (torch::isFloatingType(t.scalar_type())) {
    const auto d = flat.to(torch::kFloat64);
    for (int64_t i = 0; i < d.numel(); ++i) values.push_back(d[i].item<double>());
  } else {
    const auto d = flat.to(torch::kInt64);
    for (int64_t i = 0; i < d.numel(); ++i) values.push_back(d[i].item<int64_t>());
  }
  return {{"dtype", dtype}, {"shape", t.sizes().vec()}, {"values", values}};
}

std::string python_write(const test::TempDir& dir, const std::string& name, const std::vector<Spec>& specs,
                         const json& metadata) {
  json j = {{"metadata", metadata}, {"tensors", json::array()}};
  for (const auto& s : specs) j["tensors"].push_back({{"name", s.name}, {"dtype", s.dtype}, {"shape", s.shape}, {"values", s.values}});
  const auto spec_path = dir.file(name + ".spec.json", j.dump());
  const auto path = (dir.path() / (name + ".safetensors")).string();
  test::run_oracle("safetensors_oracle.py", "write " + spec_path + " " + path);
  return path;
}

json read_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f);
}

json python_read(const test::TempDir& dir, const std::string& path) {
  const auto out = (dir.path() / "read.json").string();
  test::run_oracle("safetensors_oracle.py", "read " + path + " " + out);
  return read_json(out);
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// A file with the given header text and `data_bytes` zero bytes; `length` overrides the length field.
std::string raw_file(const test::TempDir& dir, const std::string& header, size_t data_bytes,
                     std::optional<uint64_t> length = std::nullopt) {
  const auto path = (dir.path() / "bad.safetensors").string();
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  const uint64_t n = length.value_or(header.size());
  f.write(reinterpret_cast<const char*>(&n), 8);
  f << header << std::string(data_bytes, '\0');
  return path;
}


std::string open_error(const std::string& path) {
  return test::user_error([&] { SafetensorsFile file(path); });
}

// A checkpoint's tensors. In 1000-byte shards, "big" (1200 bytes) gets the first shard, before the
// one "embed" starts, as huggingface_hub does it; three shards in all.
constexpr int64_t kShard = 1000;
std::vector<Spec> checkpoint_specs() {
  return {spec("embed", "F32", {10, 10}, 1),        spec("norm", "BF16", {50}, 2),
          spec("big", "F32", {300}, 3),             spec("layers.0.w", "I64", {60}, 4),
          spec("layers.0.mask", "BOOL", {7}, 5),    spec("layers.1.w", "F32", {100}, 6),
          spec("scale", "F16", {}, 7)};
}

}  // namespace

TEST_CASE("files written by Python's safetensors are read with identical values", "[safetensors]") {
  test::TempDir dir;
  const auto specs = sample_specs();
  const json metadata = {{"format", "pt"}, {"note", "ünïcode \"quoted\"\n"}, {"step", "100"}};
  const SafetensorsFile file(python_write(dir, "py", specs, metadata));

  CHECK(file.metadata() == metadata.get<std::map<std::string, std::string>>());
  CHECK(file.names().size() == specs.size());
  for (const auto& s : specs) {
    INFO(s.name);
    REQUIRE(file.contains(s.name));
    CHECK(file.info(s.name).dtype == s.dtype);
    CHECK(file.info(s.name).shape == s.shape);
    const torch::Tensor t = file.tensor(s.name);
    CHECK(t.scalar_type() == kTypes.at(s.dtype));
    CHECK(describe(s.dtype, t) == json({{"dtype", s.dtype}, {"shape", s.shape}, {"values", s.values}}));
  }
  // names() follows the data layout: offsets ascend, and the data is covered without gaps.
  size_t end = 0;
  for (const auto& name : file.names()) {
    CHECK(file.info(name).begin == end);
    end = file.info(name).end;
  }
  CHECK(file.tensor("a.bf16", torch::kFloat32).equal(make(specs[2]).to(torch::kFloat32)));
  CHECK_THAT(test::user_error([&] { file.info("model.layers.3.w"); }), Contains("has no tensor \"model.layers.3.w\"") &&
                                                                 Contains("did you mean \"model.layers.2.w\"?"));
}

TEST_CASE("our files load in Python with identical values and are byte-identical to save_file's", "[safetensors]") {
  test::TempDir dir;
  const auto specs = sample_specs();
  const auto tensors = make_all(specs);

  SECTION("values, including a non-contiguous input") {
    NamedTensors with_view = tensors;
    const torch::Tensor base = torch::arange(12, torch::kFloat32).reshape({3, 4});
    with_view.emplace_back("transposed", base.t());
    const auto path = (dir.path() / "ours.safetensors").string();
    save_safetensors(path, with_view, {{"format", "pt"}});
    const json py = python_read(dir, path);
    CHECK(py["metadata"] == json({{"format", "pt"}}));
    CHECK(py["tensors"].size() == with_view.size());
    for (const auto& s : specs) {
      INFO(s.name);
      CHECK(py["tensors"][s.name] == json({{"dtype", s.dtype}, {"shape", s.shape}, {"values", s.values}}));
    }
    CHECK(py["tensors"]["transposed"] == describe("F32", base.t().contiguous()));
    CHECK_FALSE(std::filesystem::exists(path + ".tmp." + std::to_string(::getpid())));
  }

  SECTION("byte-identical with no metadata and with one entry") {
    for (const json& metadata : {json(nullptr), json({{"format", "pt"}})}) {
      INFO(metadata.dump());
      const auto ours = (dir.path() / "ours.safetensors").string();
      save_safetensors(ours, tensors, metadata.is_null() ? std::map<std::string, std::string>{}
                                                         : metadata.get<std::map<std::string, std::string>>());
      const auto theirs = python_write(dir, "theirs", specs, metadata);
      CHECK(slurp(ours) == slurp(theirs));
    }
  }

  SECTION("several metadata entries: Python orders them randomly, so compare the parsed header and data") {
    const json metadata = {{"b", "1"}, {"a", "2"}, {"zz", "3"}, {"c", "\t\x01"}};
    const auto ours = (dir.path() / "ours.safetensors").string();
    save_safetensors(ours, tensors, metadata.get<std::map<std::string, std::string>>());
    const std::string a = slurp(ours), b = slurp(python_write(dir, "theirs", specs, metadata));
    REQUIRE(a.size() == b.size());
    uint64_t n = 0;
    std::memcpy(&n, a.data(), 8);
    CHECK(json::parse(a.substr(8, n)) == json::parse(b.substr(8, n)));
    CHECK(a.substr(8 + n) == b.substr(8 + n));
  }

  SECTION("overwriting an existing file") {
    const auto path = (dir.path() / "ours.safetensors").string();
    save_safetensors(path, tensors);
    save_safetensors(path, {{"only", torch::ones({2})}});
    CHECK(SafetensorsFile(path).names() == std::vector<std::string>{"only"});
  }

  SECTION("inputs safetensors cannot hold are refused") {
    const auto path = (dir.path() / "x.safetensors").string();
    CHECK_THAT(test::user_error([&] { save_safetensors(path, {{"a", torch::ones({1})}, {"a", torch::ones({1})}}); }),
               Contains("\"a\" is given twice"));
    CHECK_THAT(test::user_error([&] { save_safetensors(path, {{"c", torch::ones({1}, torch::kComplexDouble)}}); }),
               Contains("safetensors cannot store"));
    CHECK_THAT(test::user_error([&] { save_safetensors(path, {{"__metadata__", torch::ones({1})}}); }), Contains("reserved"));
  }
}

TEST_CASE("sharded checkpoints round-trip through model.safetensors.index.json as Hugging Face splits them",
          "[safetensors]") {
  test::TempDir dir;
  const std::string ckpt = (dir.path() / "ckpt").string();
  const auto specs = checkpoint_specs();
  const auto tensors = make_all(specs);
  save_safetensors_checkpoint(ckpt, tensors, kShard);

  json names = json::array();
  for (const auto& s : specs) names.push_back(s.name);
  const auto names_path = dir.file("names.json", names.dump());
  const auto oracle = [&](int64_t shard_bytes) {
    const auto out = (dir.path() / "ckpt.json").string();
    test::run_oracle("safetensors_oracle.py",
                     "checkpoint " + ckpt + " " + std::to_string(shard_bytes) + " " + names_path + " " + out);
    return read_json(out);
  };

  const json index = read_json(ckpt + "/" + files::kSafetensorsIndex);
  const json py = oracle(kShard);
  CHECK(py["hf_sharded"] == true);
  CHECK(index["weight_map"] == py["hf_weight_map"]);
  CHECK(index["metadata"]["total_size"] == py["hf_total_size"]);
  CHECK(py["format_ok"] == true);
  CHECK_FALSE(std::filesystem::exists(ckpt + "/" + files::kSafetensors));

  const SafetensorsCheckpoint loaded(ckpt);
  std::set<std::string> files;
  for (const auto& [name, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  CHECK(loaded.shards().size() == files.size());
  CHECK(loaded.names().size() == specs.size());
  for (const auto& s : specs) {
    INFO(s.name);
    const json expected = {{"dtype", s.dtype}, {"shape", s.shape}, {"values", s.values}};
    CHECK(py["tensors"][s.name] == expected);
    CHECK(describe(s.dtype, loaded.tensor(s.name)) == expected);
    CHECK(loaded.file(s.name).path() == ckpt + "/" + index["weight_map"][s.name].get<std::string>());
  }
  CHECK(SafetensorsCheckpoint(ckpt + "/" + files::kSafetensorsIndex).names() == loaded.names());

  SECTION("re-saved small enough for one file: the shards and index are removed") {
    save_safetensors_checkpoint(ckpt, tensors);
    CHECK(std::distance(std::filesystem::directory_iterator(ckpt), std::filesystem::directory_iterator()) == 1);
    const json single = oracle(int64_t{5} << 30);
    CHECK(single["hf_sharded"] == false);
    CHECK(single["format_ok"] == true);
    CHECK(describe("F32", SafetensorsCheckpoint(ckpt).tensor("big")) == single["tensors"]["big"]);
  }
}

TEST_CASE("inconsistent sharded checkpoints are refused, naming the shard", "[safetensors]") {
  test::TempDir dir;
  const std::string ckpt = (dir.path() / "ckpt").string();
  save_safetensors_checkpoint(ckpt, make_all(checkpoint_specs()), kShard);
  const json index = read_json(ckpt + "/" + files::kSafetensorsIndex);
  const std::string first = ckpt + "/model-00001-of-00003.safetensors";
  SECTION("a missing shard") {
    std::filesystem::remove(first);
    CHECK_THAT(test::user_error([&] { SafetensorsCheckpoint c(ckpt); }),
               Contains("model-00001-of-00003.safetensors does not exist") && Contains("incomplete"));
  }
  SECTION("an index that maps a tensor to the wrong shard") {
    json edited = index;
    edited["weight_map"]["big"] = "model-00002-of-00003.safetensors";
    std::ofstream(ckpt + "/" + files::kSafetensorsIndex) << edited.dump();
    CHECK_THAT(test::user_error([&] { SafetensorsCheckpoint c(ckpt); }),
               Contains("maps tensor \"big\" to model-00002-of-00003.safetensors") && Contains("different saves"));
  }
  SECTION("a shard holding a tensor the index does not list") {
    json edited = index;
    edited["weight_map"].erase("embed");
    std::ofstream(ckpt + "/" + files::kSafetensorsIndex) << edited.dump();
    CHECK_THAT(test::user_error([&] { SafetensorsCheckpoint c(ckpt); }),
               Contains("model-00002-of-00003.safetensors holds tensor \"embed\"") && Contains("does not list"));
  }
  SECTION("an index without a weight map") {
    std::ofstream(ckpt + "/" + files::kSafetensorsIndex) << R"({"metadata": {}})";
    CHECK_THAT(test::user_error([&] { SafetensorsCheckpoint c(ckpt); }), Contains("no \"weight_map\""));
  }
  SECTION("both a single file and an index") {
    std::filesystem::copy_file(first, ckpt + "/" + files::kSafetensors);
    CHECK_THAT(test::user_error([&] { SafetensorsCheckpoint c(ckpt); }), Contains("ambiguous"));
  }
  SECTION("a tensor the checkpoint lacks") {
    CHECK_THAT(test::user_error([&] { SafetensorsCheckpoint(ckpt).tensor("layers.2.w"); }),
               Contains("checkpoint " + ckpt + " has no tensor \"layers.2.w\"") && Contains("did you mean"));
  }
  SECTION("a directory that is no checkpoint") {
    CHECK_THAT(test::user_error([&] { SafetensorsCheckpoint c(dir.path().string()); }), Contains("not a safetensors checkpoint"));
  }
}

TEST_CASE("malformed safetensors files give errors naming the file, the tensor and the fix", "[safetensors]") {
  test::TempDir dir;
  const std::string fix = "re-save or re-download";
  const auto entry = [](const std::string& body) { return R"({"w":)" + body + "}"; };
  const std::string good = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

  SECTION("the good file opens") { CHECK(SafetensorsFile(raw_file(dir, entry(good), 8)).names().size() == 1); }
  SECTION("shorter than the length field") {
    const auto path = dir.file("short.safetensors", "abc");
    CHECK_THAT(open_error(path), Contains(path) && Contains("3 bytes") && Contains("8-byte header length"));
  }
  SECTION("a header length past the end of the file") {
    const auto path = raw_file(dir, entry(good), 8, 1000);
    CHECK_THAT(open_error(path), Contains(path) && Contains("is 1000, but only 62 bytes follow") && Contains("truncated"));
  }
  SECTION("an absurd header length") {
    const auto path = raw_file(dir, entry(good), 8, 150'000'000);
    std::filesystem::resize_file(path, 150'000'100);  // sparse: costs no disk
    CHECK_THAT(open_error(path), Contains("above the format's limit"));
  }
  SECTION("a header that is not JSON") {
    CHECK_THAT(open_error(raw_file(dir, R"({"w": {"dtype": )", 0)), Contains("not valid UTF-8 JSON") && Contains(fix));
  }
  SECTION("a header that is not UTF-8") {
    CHECK_THAT(open_error(raw_file(dir, "{\"w\xff\":" + good + "}", 8)), Contains("not valid UTF-8 JSON"));
  }
  SECTION("a header that is not an object") {
    CHECK_THAT(open_error(raw_file(dir, "[1, 2]", 0)), Contains("the header is a JSON array") && Contains(fix));
  }
  SECTION("an entry that is not an object") {
    CHECK_THAT(open_error(raw_file(dir, entry("[0, 8]"), 8)), Contains("tensor \"w\": expected an object"));
  }
  SECTION("missing fields") {
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      json e = json::parse(good);
      e.erase(field);
      CHECK_THAT(open_error(raw_file(dir, entry(e.dump()), 8)),
                 Contains(std::string("tensor \"w\": \"") + field + "\" is missing") && Contains(fix));
    }
  }
  SECTION("an unknown dtype string") {
    const auto path = raw_file(dir, entry(R"({"dtype":"FP32","shape":[2],"data_offsets":[0,8]})"), 8);
    CHECK_THAT(open_error(path), Contains(path) && Contains("tensor \"w\": unknown dtype \"FP32\"") &&
                                     Contains("expected one of BOOL, U8") && Contains(fix));
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":7,"shape":[2],"data_offsets":[0,8]})"), 8)),
               Contains("\"dtype\" is 7, expected a string"));
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":"F4","shape":[2],"data_offsets":[0,1]})"), 1)),
               Contains("sub-byte dtype F4"));
  }
  SECTION("a negative or fractional dimension") {
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"), 8)),
               Contains("tensor \"w\": shape [-2] has the dimension -2; dimensions must be non-negative"));
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})"), 8)),
               Contains("dimensions must be non-negative integers"));
  }
  SECTION("offsets reversed, out of range or malformed") {
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":"F32","shape":[0],"data_offsets":[8,0]})"), 8)),
               Contains("tensor \"w\": data_offsets [8, 0] end before they begin"));
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})"), 4)),
               Contains("data_offsets [0, 8] run past the data section, which has 4 bytes"));
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0]})"), 8)),
               Contains("expected [begin, end]"));
  }
  SECTION("a byte size that is not numel * itemsize") {
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]})"), 8)),
               Contains("tensor \"w\": shape [2,3] of BF16 needs 12 bytes, but data_offsets [0, 8] span 8"));
    CHECK_THAT(open_error(raw_file(dir, entry(R"({"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]})"), 8)),
               Contains("needs more than 2^64 bytes"));
  }
  SECTION("overlaps, holes and trailing bytes in the data section") {
    const auto two = [](int a0, int a1, int b0, int b1) {
      return fmt::format(R"({{"a":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}},)"
                         R"("b":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}}}})",
                         a1 - a0, a0, a1, b1 - b0, b0, b1);
    };
    CHECK_THAT(open_error(raw_file(dir, two(0, 6, 4, 8), 8)),
               Contains("tensor \"b\" (bytes [4, 8)) overlaps tensor \"a\" (bytes [0, 6))") && Contains(fix));
    CHECK_THAT(open_error(raw_file(dir, two(0, 4, 6, 8), 8)),
               Contains("bytes [4, 6) of the data section belong to no tensor (a hole before tensor \"b\")"));
    CHECK_THAT(open_error(raw_file(dir, two(2, 4, 4, 8), 8)), Contains("bytes [0, 2)"));
    CHECK_THAT(open_error(raw_file(dir, two(0, 4, 4, 8), 10)), Contains("the last 2 bytes belong to no tensor"));
    CHECK(SafetensorsFile(raw_file(dir, two(0, 4, 4, 4), 4)).names() == std::vector<std::string>{"a", "b"});
  }
  SECTION("a name given twice") {
    CHECK_THAT(open_error(raw_file(dir, R"({"w":)" + good + R"(,"w":)" + good + "}", 8)),
               Contains("names \"w\" twice"));
  }
  SECTION("metadata that is not strings") {
    CHECK_THAT(open_error(raw_file(dir, R"({"__metadata__":{"step":100},"w":)" + good + "}", 8)),
               Contains("\"__metadata__\" entry \"step\" is 100, but metadata values must be strings"));
    CHECK_THAT(open_error(raw_file(dir, R"({"__metadata__":[],"w":)" + good + "}", 8)),
               Contains("\"__metadata__\" is [], but must be an object"));
  }
  SECTION("not a file") {
    CHECK_THAT(open_error(dir.path().string()), Contains("is not a regular file"));
    CHECK_THAT(open_error(dir.path().string() + "/none.safetensors"), Contains("cannot open") && Contains("No such file"));
  }
}

TEST_CASE("dtype conversion on load: bf16 to f32 is exact for every bit pattern", "[safetensors]") {
  test::TempDir dir;
  const auto path = (dir.path() / "all.safetensors").string();
  const torch::Tensor bits = torch::arange(-32768, 32768, torch::kInt64).to(torch::kInt16);
  const torch::Tensor f32 = torch::randn({1000}, torch::kFloat32);
  save_safetensors(path, {{"bf16", bits.view(torch::kBFloat16)}, {"f32", f32}});
  const SafetensorsFile file(path);

  const torch::Tensor widened = file.tensor("bf16", torch::kFloat32);
  CHECK(widened.scalar_type() == torch::kFloat32);
  // An f32 whose upper 16 bits are the bf16 and lower 16 bits zero, NaN payloads included.
  const torch::Tensor expected = (bits.to(torch::kInt64) & 0xFFFF) * 65536;
  CHECK(torch::equal(widened.view(torch::kInt32).to(torch::kInt64) & 0xFFFFFFFF, expected));
  CHECK(torch::equal(file.tensor("bf16").view(torch::kInt16), bits));
  // Narrowing rounds exactly as LibTorch does.
  CHECK(torch::equal(file.tensor("f32", torch::kBFloat16).view(torch::kInt16), f32.to(torch::kBFloat16).view(torch::kInt16)));
}
