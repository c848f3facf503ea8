// `moeforge data preprocess` against Megatron's preprocess_data.py semantics, with `tokenizers`
// and Megatron-Core's IndexedDatasetBuilder as the oracle (tests/oracles/megatron_data_oracle.py).
#include "core/base/errors.h"
#include "data/indexed_dataset.h"
#include "data/preprocess.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <iterator>

using namespace moeforge;
using namespace moeforge::data;
using Catch::Matchers::Contains;

namespace {
const std::string kQwen = test::source_path("../shared/data/qwen-tokenizer/tokenizer.json");
}  // namespace

TEST_CASE("preprocess writes what Megatron's preprocess_data.py writes", "[data][preprocess]") {
  test::TempDir dir;
  std::string jsonl;
  const std::vector<std::string> texts = {
      "The quick brown fox jumps over the lazy dog.", "通义千问 MoE 模型", "", "  leading and trailing  ",
      "def moe(x):\n\treturn sum(w * e(x) for w, e in topk)  # 🚀🚀", "I'm sure they'll say \"it's fine\"\r\n",
      "<|endoftext|> inside text", "ﬁ ligature and e\u0301 combining", "12345 + 3.14159 = ?"};
  for (int repeat = 0; repeat < 30; ++repeat) {
    for (const auto& t : texts) jsonl += nlohmann::json{{"text", t + std::to_string(repeat)}, {"id", repeat}}.dump() + "\n";
  }
  jsonl += nlohmann::json{{"text", ""}}.dump() + "\n";  // an empty document: no sequence, one document entry
  const auto input = dir.file("corpus.jsonl", jsonl);
  for (const bool eod : {true, false}) {
    INFO("append_eod " << eod);
    PreprocessOptions o;
    o.input = input;
    o.tokenizer = kQwen;
    o.output_prefix = (dir.path() / (eod ? "ours_eod" : "ours")).string();
    o.append_eod = eod;
    o.workers = 3;
    const auto report = preprocess_jsonl(o);
    CHECK(report.documents == 30 * static_cast<int64_t>(texts.size()) + 1);
    const auto theirs = (dir.path() / (eod ? "megatron_eod" : "megatron")).string();
    test::run_oracle("megatron_data_oracle.py",
                     "preprocess " + input + " " + kQwen + " " + theirs + " text " + (eod ? "1" : "0"));
    CHECK(report.output_prefix == o.output_prefix + "_text_document");
    CHECK(test::slurp(bin_path(report.output_prefix)) == test::slurp(bin_path(document_prefix(theirs, "text"))));
    CHECK(test::slurp(idx_path(report.output_prefix)) == test::slurp(idx_path(document_prefix(theirs, "text"))));
    const IndexedDataset d(report.output_prefix);
    CHECK(d.dtype() == TokenDType::int32);  // Qwen's vocabulary is over 65,500
  }
}

TEST_CASE("bad lines fail the run with their line number, or are skipped and counted", "[data][preprocess][errors]") {
  test::TempDir dir;
  const auto input = dir.file("bad.jsonl", "{\"text\": \"ok\"}\n{not json\n{\"body\": \"x\"}\n\xff\xfe\n\n{\"text\": 3}\n{\"text\": \"fine\"}\n");
  PreprocessOptions o;
  o.input = input;
  o.tokenizer = "byte";
  o.output_prefix = (dir.path() / "out").string();
  CHECK_THROWS_WITH(preprocess_jsonl(o), Contains("bad.jsonl:2: invalid JSON") && Contains("Nothing was written"));
  CHECK_FALSE(std::filesystem::exists(o.output_prefix + "_text_document.idx"));
  CHECK_FALSE(std::filesystem::exists(o.output_prefix + "_text_document.bin"));
  o.skip_bad_lines = true;
  const auto r = preprocess_jsonl(o);
  CHECK(r.documents == 2);
  CHECK(r.bad_lines == 5);
  REQUIRE(r.first_bad_lines.size() == 5);
  CHECK(r.first_bad_lines[0].line == 2);
  CHECK(r.first_bad_lines[1].reason == "no \"text\" key");
  CHECK(r.first_bad_lines[2].reason == "invalid UTF-8");
  CHECK(r.first_bad_lines[3].reason == "empty line");
  CHECK(r.first_bad_lines[4].reason == "\"text\" is not a string");
  const IndexedDataset d(r.output_prefix);
  CHECK(d.dtype() == TokenDType::uint16);  // the byte tokenizer's 257 ids
  CHECK(d.num_documents() == 2);
  CHECK_THROWS_WITH([&] {
    o.input = (dir.path() / "missing.jsonl").string();
    preprocess_jsonl(o);
  }(), Contains("cannot open --input"));
}

TEST_CASE("data samples --decode prints the text Hugging Face tokenizers decodes from the same ids", "[data][cli]") {
  test::TempDir dir;
  std::string jsonl;
  const std::vector<std::string> texts = {"The quick brown fox jumps over the lazy dog.", "通义千问 MoE 模型 🚀🚀",
                                          "def moe(x):\n\treturn sum(w * e(x) for w, e in topk)", "  spaced  out  "};
  for (int repeat = 0; repeat < 40; ++repeat) {
    for (const auto& t : texts) jsonl += nlohmann::json{{"text", t + std::to_string(repeat)}}.dump() + "\n";
  }
  PreprocessOptions o;
  o.input = dir.file("corpus.jsonl", jsonl);
  o.tokenizer = kQwen;
  o.output_prefix = (dir.path() / "corpus").string();
  o.append_eod = true;
  const auto prefix = preprocess_jsonl(o).output_prefix;
  const auto config = dir.file("c.yaml", std::string(test::kMinimalModel) + "data:\n  data_path: [" + prefix +
                                             "]\n  split: \"100,0,0\"\n");
  const std::string samples = test::moeforge_binary() + " data samples " + config +
                              " --first 4 --set model.vocab_size=151936 --decode " + kQwen;
  const auto r = test::run_command(samples + " --json 2>/dev/null");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto ours = nlohmann::json::parse(r.output)["samples"];
  REQUIRE(ours.size() == 4);
  std::string requests;
  for (const auto& s : ours) requests += nlohmann::json{{"decode", s["tokens"]}}.dump() + "\n";
  const auto out = (dir.path() / "decoded.json").string();
  test::run_oracle("tokenize_oracle.py", kQwen + " " + dir.file("requests.jsonl", requests) + " " + out);
  const auto theirs = nlohmann::json::parse(std::ifstream(out))["results"];
  auto hex = [](const std::string& bytes) {
    std::string h;
    for (const unsigned char c : bytes) h += fmt::format("{:02x}", c);
    return h;
  };
  for (size_t i = 0; i < 4; ++i) {
    INFO("sample " << i);
    CHECK(hex(ours[i]["text"].get<std::string>()) == theirs[i]["decoded"].get<std::string>());
  }
  // Without --json: the ids, then the text on one line, quoted and escaped.
  const auto text = test::run_command(samples + " 2>/dev/null");
  REQUIRE(text.exit_code == 0);
  CHECK_THAT(text.output, Contains("sample 1: ") && Contains("text 1: " + nlohmann::json(ours[1]["text"]).dump() + "\n"));
  CHECK_THAT(text.output, Contains("<|endoftext|>"));  // the EOD between documents
  // A tokenizer too small for the dataset's ids is named with the fix.
  const auto wrong = test::run_command(test::moeforge_binary() + " data samples " + config +
                                       " --first 1 --set model.vocab_size=151936 --decode byte");
  CHECK(wrong.exit_code == 1);
  CHECK_THAT(wrong.output, Contains("--decode byte") && Contains("outside the tokenizer's 257 ids"));
}
