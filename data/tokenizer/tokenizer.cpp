#include "data/tokenizer/tokenizer.h"

#include "data/tokenizer/added_tokens.h"
#include "data/tokenizer/bpe_model.h"
#include "data/tokenizer/regex_split.h"
#include "data/tokenizer/tokenizer_json.h"
#include "data/tokenizer/unicode_text.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace moeforge::data {
namespace {

// GPT-2's pre-tokenizer pattern, which tokenizers' ByteLevel applies when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

[[noreturn]] void bad_id(int64_t id, int64_t vocab_size) {
  throw std::out_of_range(fmt::format("token id {} is outside the vocabulary [0, {})", id, vocab_size));
}

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kEod = 256;

  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids(text.size());
    std::transform(text.begin(), text.end(), ids.begin(), [](char c) { return static_cast<unsigned char>(c); });
    return ids;
  }
  std::string decode(std::span<const int32_t> ids) const override {
    std::string text;
    text.reserve(ids.size());
    for (const int32_t id : ids) {
      if (id < 0 || id > kEod) bad_id(id, kEod + 1);
      if (id != kEod) text += static_cast<char>(id);
    }
    return text;
  }
  int64_t vocab_size() const override { return kEod + 1; }
  std::optional<int32_t> eod_id() const override { return kEod; }
  std::string name() const override { return "byte"; }
};

// The pipeline of tokenizers' encode for a byte-level BPE tokenizer.json:
// added tokens in the raw text -> NFC -> added tokens in the normalized text -> Split regexes ->
// ByteLevel (prefix space, GPT-2 regex) -> BPE per word.
class BpeTokenizer final : public Tokenizer {
 public:
  explicit BpeTokenizer(const TokenizerSpec& spec)
      : path_(spec.path),
        nfc_(spec.nfc),
        add_prefix_space_(spec.add_prefix_space),
        raw_tokens_(added_tokens(spec, false)),
        normalized_tokens_(added_tokens(spec, true)),
        model_(spec) {
    for (size_t i = 0; i < spec.splits.size(); ++i) {
      splits_.emplace_back(spec.splits[i].pattern, spec.splits[i].literal,
                           fmt::format("{}: pre_tokenizer step {}", spec.path, i));
    }
    if (spec.byte_level_regex) {
      byte_level_regex_ = std::make_unique<SplitRegex>(kGpt2Pattern, false, spec.path + ": ByteLevel");
    }
    int32_t max_id = -1;
    for (const auto& [token, id] : spec.vocab) max_id = std::max(max_id, id);
    for (const auto& token : spec.added_tokens) max_id = std::max(max_id, token.id);
    id_bytes_.resize(static_cast<size_t>(max_id + 1));
    for (const auto& [token, id] : spec.vocab) id_bytes_[static_cast<size_t>(id)] = byte_level_decode(token);
    // An added token's content wins over a vocab token with the same id, as in tokenizers.
    for (const auto& token : spec.added_tokens) {
      id_bytes_[static_cast<size_t>(token.id)] = byte_level_decode(stored_content(spec, token));
    }
    for (const char* name : {"<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"}) {
      const auto it = std::find_if(spec.added_tokens.begin(), spec.added_tokens.end(),
                                   [&](const AddedTokenSpec& t) { return t.special && t.content == name; });
      if (it != spec.added_tokens.end()) {
        eod_id_ = it->id;
        break;
      }
    }
  }

  std::vector<int32_t> encode(std::string_view input) const override {
    std::string repaired;
    std::string_view text = input;
    if (!unicode::is_valid_utf8(input)) {
      repaired = unicode::replace_invalid_utf8(input);
      text = repaired;
    }
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 1);
    std::vector<TextSegment> raw_segments, normalized_segments;
    raw_tokens_.split(text, raw_segments);
    std::string normalized;
    for (const TextSegment& raw : raw_segments) {
      if (raw.id >= 0) {
        ids.push_back(raw.id);
        continue;
      }
      const std::string_view piece = nfc_ && unicode::to_nfc(raw.text, normalized) ? normalized : raw.text;
      normalized_segments.clear();
      normalized_tokens_.split(piece, normalized_segments);
      for (const TextSegment& segment : normalized_segments) {
        if (segment.id >= 0) {
          ids.push_back(segment.id);
        } else {
          encode_plain(segment.text, ids);
        }
      }
    }
    return ids;
  }

  std::string decode(std::span<const int32_t> ids) const override {
    std::string bytes;
    for (const int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= id_bytes_.size()) bad_id(id, vocab_size());
      bytes += id_bytes_[static_cast<size_t>(id)];
    }
    // Ids that split a character decode to U+FFFD, as tokenizers' from_utf8_lossy.
    return unicode::is_valid_utf8(bytes) ? bytes : unicode::replace_invalid_utf8(bytes);
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(id_bytes_.size()); }
  std::optional<int32_t> eod_id() const override { return eod_id_; }
  std::string name() const override { return "bpe:" + path_; }

 private:
  // tokenizers keeps a normalized token's content normalized: it is matched in normalized text,
  // and decodes as normalized.
  static std::string stored_content(const TokenizerSpec& spec, const AddedTokenSpec& token) {
    std::string content = token.content;
    if (token.normalized && spec.nfc) unicode::to_nfc(token.content, content);
    return content;
  }

  static AddedTokenMatcher added_tokens(const TokenizerSpec& spec, bool normalized) {
    std::vector<AddedTokenMatcher::Token> tokens;
    for (const AddedTokenSpec& token : spec.added_tokens) {
      if (token.normalized == normalized) {
        tokens.push_back({stored_content(spec, token), token.id, token.lstrip, token.rstrip});
      }
    }
    return AddedTokenMatcher(tokens);
  }

  // Pre-tokenizes text without added tokens and appends the BPE ids of each word.
  void encode_plain(std::string_view text, std::vector<int32_t>& ids) const {
    std::vector<std::string_view> pieces{text}, next;
    for (const SplitRegex& split : splits_) {
      next.clear();
      for (const std::string_view piece : pieces) split.split(piece, next);
      pieces.swap(next);
    }
    std::string prefixed;
    std::vector<std::string_view> words;
    for (std::string_view piece : pieces) {
      if (piece.empty()) continue;
      if (add_prefix_space_ && piece.front() != ' ') {
        prefixed.clear();
        prefixed.push_back(' ');
        prefixed.append(piece);
        piece = prefixed;
      }
      if (!byte_level_regex_) {
        model_.encode_word(piece, ids);
        continue;
      }
      words.clear();
      byte_level_regex_->split(piece, words);
      for (const std::string_view word : words) model_.encode_word(word, ids);
    }
  }

  std::string path_;
  bool nfc_;
  bool add_prefix_space_;
  AddedTokenMatcher raw_tokens_;         // added tokens with normalized false
  AddedTokenMatcher normalized_tokens_;  // added tokens with normalized true
  std::vector<SplitRegex> splits_;
  std::unique_ptr<SplitRegex> byte_level_regex_;
  BpeModel model_;
  std::vector<std::string> id_bytes_;  // id -> the bytes it decodes to
  std::optional<int32_t> eod_id_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path_or_byte) {
  if (path_or_byte == "byte") return std::make_unique<ByteTokenizer>();
  return std::make_unique<BpeTokenizer>(read_tokenizer_json(path_or_byte));
}

}  // namespace moeforge::data
