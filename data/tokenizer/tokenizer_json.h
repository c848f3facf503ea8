// defines: TokenizerSpec, read_tokenizer_json
//
// The parts of a Hugging Face tokenizer.json that a byte-level BPE tokenizer uses, read and checked
// once. Every configuration moeforge cannot reproduce exactly is rejected here with a UserError
// naming the file and the field, rather than tokenized differently from `tokenizers`.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace moeforge::data {

struct AddedTokenSpec {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool normalized = false;  // matched in the normalized text (after NFC) rather than the raw text
  bool lstrip = false;      // the match takes the white space before it
  bool rstrip = false;      // the match takes the white space after it
};

struct SplitSpec {
  std::string pattern;
  bool literal = false;  // {"String": ...} rather than {"Regex": ...}
};

struct TokenizerSpec {
  std::string path;
  bool nfc = false;
  std::vector<SplitSpec> splits;     // Split pre-tokenizers, in order, before ByteLevel
  bool add_prefix_space = false;     // ByteLevel's
  bool byte_level_regex = false;     // ByteLevel's use_regex: split with GPT-2's pattern
  std::vector<std::pair<std::string, int32_t>> vocab;            // tokens in the byte-level alphabet
  std::vector<std::pair<std::string, std::string>> merges;       // in rank order
  std::optional<std::string> unk_token;
  bool fuse_unk = false;
  bool ignore_merges = false;
  std::vector<AddedTokenSpec> added_tokens;
};

// Throws UserError for a missing or unreadable file, malformed JSON, or a configuration that is
// not byte-level BPE as described in data/tokenizer/tokenizer.h.
TokenizerSpec read_tokenizer_json(const std::string& path);

}  // namespace moeforge::data
