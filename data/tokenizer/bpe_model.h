// defines: BpeModel, byte_level_decode
//
// The BPE model of a byte-level tokenizer: a word's bytes start as one symbol each and the
// adjacent pair with the lowest merge rank is merged (leftmost first on ties) until no pair has a
// merge, exactly as `tokenizers`' BPE does. Results for short words are cached.
#pragma once

#include "data/tokenizer/tokenizer_json.h"

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace moeforge::data {

// The bytes a token in the byte-level alphabet stands for; a token with a character outside the
// alphabet (an added token such as "<|endoftext|> x" with a real space) stands for its own UTF-8,
// as in tokenizers' ByteLevel decoder.
std::string byte_level_decode(std::string_view token);

class BpeModel {
 public:
  // Throws UserError (naming spec.path) when a merge names a token missing from the vocab.
  explicit BpeModel(const TokenizerSpec& spec);
  ~BpeModel();
  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of one pre-tokenized word, given as its raw bytes. Thread-safe.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

 private:
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  class WordCache;

  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
  const Merge* find_merge(int32_t left, int32_t right) const;

  std::array<int32_t, 256> byte_ids_{};  // the id of each byte's one-character token, or -1
  std::unordered_map<uint64_t, Merge> merges_;  // key: left id << 32 | right id
  std::unordered_map<std::string, int32_t> byte_vocab_;  // raw bytes -> id, for ignore_merges
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  std::unique_ptr<WordCache> cache_;
};

}  // namespace moeforge::data
