#define PCRE2_CODE_UNIT_WIDTH 8
#include "data/tokenizer/regex_split.h"

#include "core/base/errors.h"

#include <pcre2.h>

#include <array>
#include <stdexcept>

namespace moeforge::data {
namespace {

// Oniguruma's `\s` is Unicode White_Space: U+0009..U+000D, U+0085 and the Z categories. PCRE2's
// (with UCP) also matches U+180E, which Unicode stopped calling a space in 6.3; so `\s` and `\S`
// are spelled out. Inside a character class `\s` becomes the class members; a negated `\S` there
// has no such spelling and is rejected.
std::string oniguruma_to_pcre2(std::string_view pattern, const std::string& where) {
  constexpr std::string_view kSpace = "\\t-\\r\\x{85}\\p{Z}";
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 's') {
        out += in_class ? std::string(kSpace) : "[" + std::string(kSpace) + "]";
      } else if (e == 'S') {
        if (in_class) {
          fail_user("{}: `\\S` inside a character class is not supported by moeforge's tokenizer "
                    "(pattern {}); rewrite it without `\\S` in brackets",
                    where, pattern);
        }
        out += "[^" + std::string(kSpace) + "]";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A `]` right after `[` or `[^` is a literal member, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

// Per-thread match state: match data and a JIT stack big enough for long runs of one class.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  MatchScratch() {
    if (data == nullptr || context == nullptr || stack == nullptr) throw std::bad_alloc();
    pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;
};

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  pcre2_get_error_message(code, buffer.data(), buffer.size());
  return reinterpret_cast<const char*>(buffer.data());
}

}  // namespace

void SplitRegex::CodeDeleter::operator()(pcre2_real_code_8* code) const { pcre2_code_free(code); }

SplitRegex::SplitRegex(std::string_view pattern, bool literal, const std::string& where) {
  if (pattern.empty()) fail_user("{}: the split pattern is empty; give a non-empty pattern", where);
  const std::string translated = literal ? std::string(pattern) : oniguruma_to_pcre2(pattern, where);
  const uint32_t options = literal ? (PCRE2_UTF | PCRE2_LITERAL) : (PCRE2_UTF | PCRE2_UCP);
  int error = 0;
  PCRE2_SIZE offset = 0;
  code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                            options, &error, &offset, nullptr));
  if (!code_) {
    fail_user("{}: cannot compile the split pattern {} (PCRE2: {} at offset {}); moeforge supports "
              "the regex syntax shared by Oniguruma and PCRE2",
              where, pattern, pcre2_message(error), offset);
  }
  // JIT is an optimization only: without it (a PCRE2 built without JIT) the interpreter runs.
  jit_ = pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE) == 0;
}

void SplitRegex::split(std::string_view text, std::vector<std::string_view>& out) const {
  thread_local MatchScratch scratch;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t gap_start = 0;  // the first byte not yet emitted
  size_t search = 0;
  while (search < text.size()) {
    // The text was validated once by the caller; PCRE2 would otherwise re-check it every call.
    const int rc = jit_ ? pcre2_jit_match(code_.get(), subject, text.size(), search, PCRE2_NO_UTF_CHECK,
                                          scratch.data, scratch.context)
                        : pcre2_match(code_.get(), subject, text.size(), search, PCRE2_NO_UTF_CHECK,
                                      scratch.data, scratch.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) throw std::runtime_error("tokenizer split regex failed: " + pcre2_message(rc));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
    const size_t begin = ovector[0], end = ovector[1];
    if (begin == end) {
      // An empty match splits nothing; search again from the next character.
      search = end + 1;
      while (search < text.size() && (static_cast<unsigned char>(text[search]) & 0xC0) == 0x80) ++search;
      continue;
    }
    if (begin > gap_start) out.push_back(text.substr(gap_start, begin - gap_start));
    out.push_back(text.substr(begin, end - begin));
    gap_start = search = end;
  }
  if (gap_start < text.size()) out.push_back(text.substr(gap_start));
}

}  // namespace moeforge::data
