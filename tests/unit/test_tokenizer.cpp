// The BPE tokenizer against Hugging Face `tokenizers` (tests/oracles/tokenize_oracle.py) on the
// Qwen tokenizer.json and on variants exercising the other supported fields; the byte tokenizer.
#include "core/base/errors.h"
#include "data/tokenizer/tokenizer.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

using namespace moeforge;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

std::string qwen_tokenizer_path() {
  const std::string path = test::source_path("../shared/data/qwen-tokenizer/tokenizer.json");
  if (!std::filesystem::exists(path)) {
    FAIL("the Qwen tokenizer is missing at " << path << " (it comes with the shared/ folder)");
  }
  return path;
}

std::string hex(std::string_view bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (const char c : bytes) {
    out += digits[static_cast<unsigned char>(c) >> 4];
    out += digits[static_cast<unsigned char>(c) & 15];
  }
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Hand-picked cases: the scripts, spacing and special tokens the brief names.
std::vector<std::string> hand_corpus() {
  return {
      "",
      "Hello world",
      "The quick brown fox jumps over the lazy dog. It's 3.14 o'clock; 12345 apples!",
      "I'm you'll THEY'RE we've she'd He'S it'ſſ x'KK don't",
      "大语言模型的预训练需要大量的文本数据。混合专家模型（MoE）在每个词元上只激活部分参数。",
      "日本語のテキストです。カタカナとひらがな、そして漢字。ｶﾀｶﾅ ｈａｌｆ",
      "한국어 문장도 있습니다. 조합형 한글: \u1100\u1161\u11a8",
      "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}  # comment\n    else:\n        pass\n",
      "int main() {\r\n    std::vector<int> v{1,2,3};\r\n    return v[0] != 0 ? 1 : -1;\r\n}\r\n",
      "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 keycap 1️⃣ 🇩🇪🇯🇵",
      "combining: e\u0301 a\u0308 o\u0302\u0323 A\u030a \u212b \u1e9b\u0323 ka\u3099 \u304b\u3099",
      // Marks and composites newer than Unicode 9.0, which tokenizers' NFC leaves alone.
      "new marks: x\u0301\u07fd a\u0301\u1ac1\u0316 \U00011935\U00011930 \u0b95\u1df6\u0301 \U0001e4ec\u0316",
      "spaces:   three  two\u00a0nbsp\u3000ideographic \u2028ls\u2029ps \u0085nel \u200bzw\u180emv",
      "nel a\u0085\u0085b x\u0085\nb \u0085\u0085 c\u0085",  // NEL is white space to Oniguruma,
      "mvs a\u180e\u180eb x\u180e\nb \u180e",            // U+180E is not (it is to PCRE2)
      "trailing spaces   ",
      "   leading spaces",
      "\n\n\n\nnewline runs\n\n \n\t\n",
      "\r\n\r\n\r\n",
      "tabs\t\t\tand\t \tmixed",
      "numbers 1 12 123 1234 12345 123456 3.14159 1,000,000 ١٢٣ Ⅻ ½ ²",
      "<|endoftext|>",
      "doc one<|endoftext|>doc two<|endoftext|><|endoftext|>",
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>",
      "<|endoftext <|endoftext|x <tool_call></tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
      std::string(3000, 'a'),
      "Pneumonoultramicroscopicsilicovolcanoconiosis" + std::string(500, 'z') + " end",
      std::string(2000, ' ') + "x",
      "https://example.com/path?q=1&r=2#frag user@example.org C:\\Windows\\System32",
      "Ünïcödé façade naïve résumé coöperate Straße ΣΊΣΥΦΟΣ Ελληνικά Русский текст עברית العربية",
      "math: ∑_{i=1}^{n} x_i² ≤ ∞ → ∀ε>0 ∃δ",
      std::string("nul\0byte", 8),
      "\x1c\x1d\x1e\x1f controls \x7f\x01",
      // Invalid UTF-8: truncated sequences, stray continuation bytes, overlong, surrogates.
      "bad \xff\xfe bytes",
      "truncated \xe4\xb8 and \xf0\x9f\x98 end",
      "overlong \xc0\xaf \xe0\x80\xaf surrogate \xed\xa0\x80 high \xf4\x90\x80\x80",
      "lone \x80\x80 continuation \xc3",
      "\xe4",
  };
}

// Random mixtures of the troublesome pieces, a fixed seed so failures reproduce.
std::vector<std::string> fuzz_corpus(size_t count) {
  const std::vector<std::string> pool = {
      "a", "Z", "k", "s", "the", " ", "  ", "\t", "\n", "\r", "\r\n", "'", "'s", "'T", "'re", "'LL", "'ſ",
      "0", "7", "42", ".", ",", "!", "?", "(", ")", "-", "_", "/", "\\", "\"", "#", "é", "e\u0301",
      "\u0301", "\u0308", "\u0323", "\u0345", "\u07fd", "\u1ac1", "ñ", "ß", "\u00a0", "\u00ad", "\u0085", "\u2028",
      "\u3000", "\u180e", "\u200b", "\u200d", "\ufe0f", "\u1680", "\u2003", "中", "文字", "か", "\u3099", "ガ",
      "한", "\u1100", "\u1161", "\u11a8", "😀", "🏽", "👨‍👩‍👧", "١٢", "Ⅻ", "½", "\u212a", "\ue000",
      "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|endoftext", "<think>", "</tool_call>",
      "\xff", "\xc3", "\xe4\xb8", "\xed\xa0\x80", "\xf0\x9f\x98", "\xc0\xaf", "\x80",
  };
  std::mt19937 rng(20240611);
  std::vector<std::string> corpus;
  for (size_t i = 0; i < count; ++i) {
    std::string text;
    const size_t pieces = 1 + rng() % 40;
    for (size_t p = 0; p < pieces; ++p) text += pool[rng() % pool.size()];
    corpus.push_back(text);
  }
  return corpus;
}

// Real text: the project's own docs and sources, and the Qwen chat template.
std::vector<std::string> file_corpus() {
  std::vector<std::string> corpus;
  for (const char* file : {"README.md", "docs/architecture.md", "data/tokenizer/tokenizer.cpp", "data/tokenizer/bpe_model.cpp",
                           "launch/setup.sh", "tests/oracles/tokenize_oracle.py"}) {
    corpus.push_back(read_file(test::source_path(file)));
  }
  corpus.push_back(read_file(test::source_path("../shared/data/qwen-tokenizer/tokenizer_config.json")));
  return corpus;
}

std::vector<std::string> full_corpus() {
  auto corpus = hand_corpus();
  for (auto& text : file_corpus()) corpus.push_back(std::move(text));
  for (auto& text : fuzz_corpus(400)) corpus.push_back(std::move(text));
  return corpus;
}

struct OracleResult {
  json info;
  std::vector<std::vector<int32_t>> ids;  // per encode request
  std::vector<std::string> decoded;       // per request
  std::vector<bool> valid_nfc;            // per encode request: the text is valid UTF-8 and NFC
};

OracleResult run_tokenizer_oracle(const std::string& tokenizer, const std::vector<std::string>& texts,
                                  const std::vector<std::vector<int32_t>>& decodes = {}) {
  test::TempDir dir;
  std::ofstream requests(dir.path() / "requests.jsonl");
  for (const auto& text : texts) requests << json{{"encode", hex(text)}}.dump() << "\n";
  for (const auto& ids : decodes) requests << json{{"decode", ids}}.dump() << "\n";
  requests.close();
  const auto out = (dir.path() / "out.json").string();
  test::run_oracle("tokenize_oracle.py", tokenizer + " " + (dir.path() / "requests.jsonl").string() + " " + out);
  OracleResult result;
  result.info = json::parse(read_file(out));
  for (const auto& r : result.info.at("results")) {
    if (r.contains("ids")) {
      result.ids.push_back(r.at("ids").get<std::vector<int32_t>>());
      result.valid_nfc.push_back(r.at("valid_nfc").get<bool>());
    }
    const auto h = r.at("decoded").get<std::string>();
    std::string bytes;
    for (size_t i = 0; i + 1 < h.size(); i += 2) bytes += static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16));
    result.decoded.push_back(bytes);
  }
  return result;
}

// Every text encodes to the oracle's ids and decodes to the oracle's text; returns how many matched.
size_t compare_with_oracle(const data::Tokenizer& tok, const OracleResult& oracle, const std::vector<std::string>& corpus) {
  REQUIRE(oracle.ids.size() == corpus.size());
  size_t identical = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const auto ids = tok.encode(corpus[i]);
    INFO("text #" << i << " (hex " << hex(corpus[i].substr(0, 200)) << ")");
    CHECK(ids == oracle.ids[i]);
    CHECK(tok.decode(ids) == oracle.decoded[i]);
    identical += ids == oracle.ids[i] ? 1 : 0;
  }
  return identical;
}

// A variant of the Qwen tokenizer.json written to `dir`.
std::string write_variant(const test::TempDir& dir, const std::string& name, const std::function<void(json&)>& edit) {
  json config = json::parse(read_file(qwen_tokenizer_path()));
  edit(config);
  const auto path = (dir.path() / name).string();
  std::ofstream(path) << config.dump();
  return path;
}

}  // namespace

TEST_CASE("BPE tokenizer gives tokenizers' ids for the Qwen tokenizer", "[tokenizer]") {
  const auto path = qwen_tokenizer_path();
  const auto tok = data::load_tokenizer(path);
  const auto corpus = full_corpus();
  const auto oracle = run_tokenizer_oracle(path, corpus);
  const size_t identical = compare_with_oracle(*tok, oracle, corpus);
  CHECK(identical == corpus.size());
  WARN("Qwen tokenizer: " << identical << " of " << corpus.size() << " texts identical to tokenizers");

  CHECK(tok->vocab_size() == oracle.info.at("vocab_size").get<int64_t>());
  CHECK(tok->eod_id() == oracle.info.at("endoftext_id").get<int32_t>());
  CHECK(*tok->eod_id() == 151643);
  CHECK_FALSE(oracle.info.at("post_processor_adds").get<bool>());  // encode never adds BOS/EOS
  CHECK(tok->name() == "bpe:" + path);

  // Valid NFC text comes back exactly; the rest comes back repaired and composed.
  size_t round_trips = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    if (!oracle.valid_nfc[i]) continue;
    INFO("text #" << i);
    CHECK(tok->decode(tok->encode(corpus[i])) == corpus[i]);
    ++round_trips;
  }
  CHECK(round_trips > corpus.size() / 5);
}

TEST_CASE("BPE tokenizer decodes any ids like tokenizers", "[tokenizer]") {
  const auto path = qwen_tokenizer_path();
  const auto tok = data::load_tokenizer(path);
  std::mt19937 rng(7);
  std::vector<std::vector<int32_t>> sequences;
  for (int s = 0; s < 200; ++s) {
    std::vector<int32_t> ids(1 + rng() % 12);
    for (auto& id : ids) id = static_cast<int32_t>(rng() % static_cast<uint32_t>(tok->vocab_size()));
    sequences.push_back(ids);
  }
  sequences.push_back({151643, 151644, 151657, 151668});  // added tokens, special or not
  sequences.push_back({});
  const auto oracle = run_tokenizer_oracle(path, {}, sequences);
  for (size_t i = 0; i < sequences.size(); ++i) CHECK(tok->decode(sequences[i]) == oracle.decoded[i]);
  CHECK_THROWS_AS(tok->decode(std::vector<int32_t>{static_cast<int32_t>(tok->vocab_size())}), std::out_of_range);
  CHECK_THROWS_AS(tok->decode(std::vector<int32_t>{-1}), std::out_of_range);
}

TEST_CASE("BPE tokenizer follows the other supported tokenizer.json fields", "[tokenizer]") {
  test::TempDir dir;
  const auto corpus = [] {
    auto c = hand_corpus();
    for (auto& text : fuzz_corpus(150)) c.push_back(std::move(text));
    c.push_back("x <mask> y  <mask>\t\tz<mask>\u2003<mask> é!e\u0301! hello world! hello worldly");
    c.push_back("<mask><mask>  <mask>   ");
    return c;
  }();
  const json extra_tokens = json::array({
      {{"id", 151669}, {"content", "<mask>"}, {"lstrip", true}, {"rstrip", true}, {"normalized", false},
       {"special", true}, {"single_word", false}},
      {{"id", 151670}, {"content", "e\u0301!"}, {"lstrip", false}, {"rstrip", false}, {"normalized", true},
       {"special", false}, {"single_word", false}},
      {{"id", 151671}, {"content", "hello world"}, {"lstrip", false}, {"rstrip", false}, {"normalized", true},
       {"special", false}, {"single_word", false}},
  });

  SECTION("GPT-2 style: ByteLevel with its own regex and prefix space, no normalizer, string merges") {
    const auto path = write_variant(dir, "gpt2.json", [&](json& c) {
      c["normalizer"] = nullptr;
      c["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
      for (auto& merge : c["model"]["merges"]) merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
      for (const auto& t : extra_tokens) c["added_tokens"].push_back(t);
    });
    const auto tok = data::load_tokenizer(path);
    CHECK(compare_with_oracle(*tok, run_tokenizer_oracle(path, corpus), corpus) == corpus.size());
  }
  SECTION("NFC-normalized added tokens, ignore_merges, a Sequence normalizer") {
    const auto path = write_variant(dir, "qwen-variant.json", [&](json& c) {
      c["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}})}};
      c["model"]["ignore_merges"] = true;
      for (const auto& t : extra_tokens) c["added_tokens"].push_back(t);
    });
    const auto tok = data::load_tokenizer(path);
    CHECK(compare_with_oracle(*tok, run_tokenizer_oracle(path, corpus), corpus) == corpus.size());
    CHECK(tok->vocab_size() == 151672);
  }
}

TEST_CASE("BPE tokenizer encodes from many threads at once", "[tokenizer]") {
  const auto tok = data::load_tokenizer(qwen_tokenizer_path());
  const auto corpus = full_corpus();
  std::vector<std::vector<int32_t>> expected;
  for (const auto& text : corpus) expected.push_back(tok->encode(text));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < mismatches.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        for (size_t i = t; i < corpus.size() + t; ++i) {
          const size_t k = (i * 7 + round) % corpus.size();
          if (tok->encode(corpus[k]) != expected[k]) ++mismatches[t];
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(mismatches == std::vector<int>(4, 0));
}

TEST_CASE("BPE tokenizer rejects what it cannot reproduce, naming the file", "[tokenizer]") {
  test::TempDir dir;
  CHECK_THROWS_WITH(data::load_tokenizer("/no/such/tokenizer.json"),
                    Contains("/no/such/tokenizer.json") && Contains("does not exist"));
  CHECK_THROWS_WITH(data::load_tokenizer(dir.path().string()), Contains("is a directory"));
  const auto broken = dir.file("broken.json", "{\"model\": {\"type\": \"BPE\", ");
  CHECK_THROWS_WITH(data::load_tokenizer(broken), Contains(broken) && Contains("not valid JSON"));

  const auto rejects = [&](const std::string& name, const std::function<void(json&)>& edit, const std::string& message) {
    const auto path = write_variant(dir, name, edit);
    CHECK_THROWS_AS(data::load_tokenizer(path), UserError);
    CHECK_THROWS_WITH(data::load_tokenizer(path), Contains(path) && Contains(message));
  };
  rejects("wordpiece.json", [](json& c) { c["model"]["type"] = "WordPiece"; }, "unsupported model type \"WordPiece\"");
  rejects("nfkc.json", [](json& c) { c["normalizer"] = {{"type", "NFKC"}}; }, "unsupported normalizer");
  rejects("metaspace.json", [](json& c) { c["pre_tokenizer"] = {{"type", "Metaspace"}}; }, "does not end with ByteLevel");
  rejects("removed.json", [](json& c) { c["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; },
          "behavior \"Removed\"");
  rejects("dropout.json", [](json& c) { c["model"]["dropout"] = 0.1; }, "dropout");
  rejects("fallback.json", [](json& c) { c["model"]["byte_fallback"] = true; }, "byte_fallback");
  rejects("single-word.json", [](json& c) { c["added_tokens"][0]["single_word"] = true; }, "single_word");
  rejects("decoder.json", [](json& c) { c["decoder"] = {{"type", "WordPiece"}}; }, "unsupported decoder");
  rejects("truncation.json", [](json& c) { c["truncation"] = {{"max_length", 8}}; }, "`truncation` is set");
  rejects("merge.json", [](json& c) { c["model"]["merges"].push_back({"Ġ", "nonexistent-token"}); },
          "not in model.vocab");
  rejects("regex.json", [](json& c) { c["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed"; },
          "cannot compile the split pattern");
}

TEST_CASE("byte tokenizer maps bytes to ids losslessly", "[tokenizer]") {
  const auto tok = data::load_tokenizer("byte");
  CHECK(tok->name() == "byte");
  CHECK(tok->vocab_size() == 257);
  CHECK(tok->eod_id() == 256);
  const std::string text("héllo \xff\x00<|endoftext|>", 21);
  const auto ids = tok->encode(text);
  REQUIRE(ids.size() == text.size());
  CHECK(ids[0] == 'h');
  CHECK(ids[1] == 0xC3);
  CHECK(ids[7] == 0xFF);
  CHECK(ids[8] == 0);
  CHECK(tok->decode(ids) == text);  // any bytes, valid UTF-8 or not
  auto with_eod = ids;
  with_eod.push_back(256);
  CHECK(tok->decode(with_eod) == text);
  CHECK(tok->encode("").empty());
  CHECK_THROWS_AS(tok->decode(std::vector<int32_t>{257}), std::out_of_range);
}
