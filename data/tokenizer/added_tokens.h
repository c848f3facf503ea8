// defines: TextSegment, AddedTokenMatcher
//
// Finds added tokens ("<|endoftext|>", "<|im_start|>", ...) in text the way `tokenizers`'
// AddedVocabulary does: scanning left to right, the match starting first wins and among those the
// longest (Aho-Corasick leftmost-longest), with lstrip/rstrip widening a match over adjacent
// Unicode white space.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge::data {

struct TextSegment {
  std::string_view text;
  int32_t id = -1;  // the added token's id, or -1 for plain text between added tokens
};

class AddedTokenMatcher {
 public:
  struct Token {
    std::string content;
    int32_t id = 0;
    bool lstrip = false;
    bool rstrip = false;
  };

  explicit AddedTokenMatcher(const std::vector<Token>& tokens);

  // Appends the segments of `text` (valid UTF-8) in order: added tokens and the non-empty plain
  // stretches between them.
  void split(std::string_view text, std::vector<TextSegment>& out) const;

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;
    int32_t token = -1;  // index into tokens_ of the token ending here
  };
  // The longest token starting at text[pos]: its index and byte length, or {-1, 0}.
  std::pair<int32_t, size_t> longest_at(std::string_view text, size_t pos) const;

  std::vector<Token> tokens_;
  std::vector<Node> nodes_{1};  // nodes_[0] is the root
  std::vector<bool> first_bytes_ = std::vector<bool>(256, false);
};

}  // namespace moeforge::data
