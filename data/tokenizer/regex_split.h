// defines: SplitRegex
//
// The regex splitting of `tokenizers`' Split and ByteLevel pre-tokenizers, on PCRE2 (JIT-compiled
// where available). tokenizers compiles its patterns with Oniguruma; the patterns in tokenizer.json
// files mean the same under PCRE2 with UTF and Unicode properties on, except that PCRE2's `\s`
// also matches U+180E, so the constructor spells `\s` out as Oniguruma's set.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

struct pcre2_real_code_8;

namespace moeforge::data {

class SplitRegex {
 public:
  // `pattern` as written in tokenizer.json; `literal` for a {"String": ...} pattern, which matches
  // itself. Throws UserError naming `where` (file and field) when the pattern cannot be compiled.
  SplitRegex(std::string_view pattern, bool literal, const std::string& where);

  // Appends to `out` the pieces of `text` (valid UTF-8) in order: each match, and each stretch
  // between matches; empty pieces are dropped (tokenizers' "Isolated" behaviour). Thread-safe.
  void split(std::string_view text, std::vector<std::string_view>& out) const;

 private:
  struct CodeDeleter {
    void operator()(pcre2_real_code_8* code) const;
  };
  std::unique_ptr<pcre2_real_code_8, CodeDeleter> code_;
  bool jit_ = false;
};

}  // namespace moeforge::data
