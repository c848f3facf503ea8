#include "data/tokenizer/added_tokens.h"

#include "data/tokenizer/unicode_text.h"

#include <algorithm>

namespace moeforge::data {
namespace {

// Where the run of white space that ends at `end` begins.
size_t white_space_start(std::string_view text, size_t end) {
  while (end > 0) {
    size_t lead = end - 1;
    while (lead > 0 && (static_cast<unsigned char>(text[lead]) & 0xC0) == 0x80) --lead;
    size_t pos = lead;
    if (!unicode::is_white_space(unicode::next_code_point(text, pos))) break;
    end = lead;
  }
  return end;
}

// Where the run of white space that starts at `begin` ends.
size_t white_space_end(std::string_view text, size_t begin) {
  while (begin < text.size()) {
    size_t pos = begin;
    if (!unicode::is_white_space(unicode::next_code_point(text, pos))) break;
    begin = pos;
  }
  return begin;
}

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(const std::vector<Token>& tokens) : tokens_(tokens) {
  for (size_t t = 0; t < tokens_.size(); ++t) {
    const std::string& content = tokens_[t].content;
    first_bytes_[static_cast<unsigned char>(content[0])] = true;
    int32_t node = 0;
    for (const char ch : content) {
      const auto c = static_cast<unsigned char>(ch);
      auto& children = nodes_[static_cast<size_t>(node)].children;
      const auto it = std::find_if(children.begin(), children.end(), [&](const auto& e) { return e.first == c; });
      if (it != children.end()) {
        node = it->second;
        continue;
      }
      const auto child = static_cast<int32_t>(nodes_.size());
      children.emplace_back(c, child);  // before the push_back below may move `children`
      nodes_.emplace_back();
      node = child;
    }
    // The same content twice: the later entry wins, as in tokenizers' token map.
    nodes_[static_cast<size_t>(node)].token = static_cast<int32_t>(t);
  }
}

std::pair<int32_t, size_t> AddedTokenMatcher::longest_at(std::string_view text, size_t pos) const {
  std::pair<int32_t, size_t> best{-1, 0};
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    const auto& children = nodes_[static_cast<size_t>(node)].children;
    const auto it = std::find_if(children.begin(), children.end(), [&](const auto& e) { return e.first == c; });
    if (it == children.end()) break;
    node = it->second;
    if (nodes_[static_cast<size_t>(node)].token >= 0) best = {nodes_[static_cast<size_t>(node)].token, i + 1 - pos};
  }
  return best;
}

void AddedTokenMatcher::split(std::string_view text, std::vector<TextSegment>& out) const {
  size_t emitted = 0;  // text before this is in `out`
  size_t pos = 0;
  while (pos < text.size()) {
    if (!first_bytes_[static_cast<unsigned char>(text[pos])]) {
      ++pos;
      continue;
    }
    const auto [index, length] = longest_at(text, pos);
    if (index < 0) {
      ++pos;
      continue;
    }
    const Token& token = tokens_[static_cast<size_t>(index)];
    size_t begin = pos, end = pos + length;
    // White space already taken by the previous match's rstrip stays with it.
    if (token.lstrip) begin = std::max(white_space_start(text, begin), emitted);
    if (token.rstrip) end = white_space_end(text, end);
    if (begin > emitted) out.push_back({text.substr(emitted, begin - emitted), -1});
    out.push_back({text.substr(begin, end - begin), token.id});
    emitted = end;
    // The search goes on after the token itself, as the Aho-Corasick iteration does.
    pos += length;
  }
  if (emitted < text.size()) out.push_back({text.substr(emitted), -1});
}

}  // namespace moeforge::data
