#include "data/tokenizer/unicode_text.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>

namespace moeforge::data::unicode {
namespace {

// Length of the well-formed UTF-8 sequence at text[pos], or 0 when it is ill-formed; then
// `subpart` is the length of its maximal subpart (the bytes that together become one U+FFFD).
size_t sequence_length(std::string_view text, size_t pos, size_t& subpart) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(pos);
  if (lead < 0x80) return 1;
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte (RFC 3629's table)
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 1;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 2;
    if (lead == 0xE0) lo = 0xA0;  // overlong
    if (lead == 0xED) hi = 0x9F;  // surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 3;
    if (lead == 0xF0) lo = 0x90;  // overlong
    if (lead == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    subpart = 1;
    return 0;
  }
  for (size_t k = 1; k <= need; ++k) {
    if (pos + k >= text.size()) {
      subpart = k;
      return 0;
    }
    const unsigned char b = byte(pos + k);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      subpart = k;
      return 0;
    }
  }
  return need + 1;
}

// Code points that NFC never changes and that never compose with the character before them, so
// text made only of them is already NFC. Checked against Python's unicodedata (Unicode 14):
// none of them is a second element of a canonical composition, combining, or changed by NFC.
bool nfc_inert(char32_t cp) {
  return cp < 0x300 || (cp >= 0x3041 && cp <= 0x3096) || (cp >= 0x30A1 && cp <= 0x30FA) ||
         (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0xAC00 && cp <= 0xD7A3);
}

// Code points that Unicode 10 to 15 made combining, decomposable or composable. tokenizers
// normalizes with Unicode 9.0 data, where they are plain characters that nothing reorders or
// composes across, while utf8proc has Unicode 15. Measured: every code point utf8proc gives a
// combining class, a canonical decomposition or a composition role, on which tokenizers 0.23's NFC
// and utf8proc's disagree (alone, next to marks of classes 1, 220 and 230, or decomposed), with
// the parts of such composites.
constexpr std::array<std::pair<char32_t, char32_t>, 39> kPlainForTokenizers = {{
    {0x7FD, 0x7FD}, {0x898, 0x89F}, {0x8CA, 0x8D3}, {0x9FE, 0x9FE}, {0xC3C, 0xC3C}, {0xD3B, 0xD3C},
    {0xEBA, 0xEBA}, {0x1715, 0x1715}, {0x1ABF, 0x1ACE}, {0x1DF6, 0x1DFA}, {0xA82C, 0xA82C},
    {0x10D24, 0x10D27}, {0x10EAB, 0x10EAC}, {0x10EFD, 0x10EFF}, {0x10F46, 0x10F50},
    {0x10F82, 0x10F85}, {0x11070, 0x11070}, {0x1133B, 0x1133B}, {0x1145E, 0x1145E},
    {0x11839, 0x1183A}, {0x11930, 0x11930}, {0x11935, 0x11935}, {0x11938, 0x11938},
    {0x1193D, 0x1193E}, {0x11943, 0x11943}, {0x119E0, 0x119E0}, {0x11A34, 0x11A34},
    {0x11A47, 0x11A47}, {0x11A99, 0x11A99}, {0x11D42, 0x11D42}, {0x11D44, 0x11D45},
    {0x11D97, 0x11D97}, {0x11F41, 0x11F42}, {0x16FF0, 0x16FF1}, {0x1E08F, 0x1E08F},
    {0x1E130, 0x1E136}, {0x1E2AE, 0x1E2AE}, {0x1E2EC, 0x1E2EF}, {0x1E4EC, 0x1E4EF},
}};

bool plain_for_tokenizers(char32_t cp) {
  const auto it = std::upper_bound(kPlainForTokenizers.begin(), kPlainForTokenizers.end(), cp,
                                   [](char32_t c, const auto& range) { return c < range.first; });
  return it != kPlainForTokenizers.begin() && cp <= std::prev(it)->second;
}

// utf8proc's NFC of valid UTF-8, appended to `out`.
void append_utf8proc_nfc(std::string_view text, std::string& out) {
  if (text.empty()) return;
  utf8proc_uint8_t* composed = nullptr;
  // An explicit length (no UTF8PROC_NULLTERM) keeps U+0000 as an ordinary character.
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                   static_cast<utf8proc_ssize_t>(text.size()), &composed,
                   static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  const std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> owner(composed, &std::free);
  if (n < 0) {
    // The tokenizer repairs invalid UTF-8 before normalizing, so this is a bug, not bad input.
    throw std::logic_error(std::string("utf8proc NFC failed: ") + utf8proc_errmsg(n));
  }
  out.append(reinterpret_cast<const char*>(composed), static_cast<size_t>(n));
}

std::array<char32_t, 256> make_byte_level_alphabet() {
  // Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, DEL,
  // NBSP, soft hyphen) take the code points from U+0100 on, in byte order.
  std::array<char32_t, 256> alphabet{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    alphabet[static_cast<size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
  }
  return alphabet;
}

}  // namespace

bool is_valid_utf8(std::string_view text) {
  size_t pos = 0, subpart = 0;
  while (pos < text.size()) {
    if (static_cast<unsigned char>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const size_t n = sequence_length(text, pos, subpart);
    if (n == 0) return false;
    pos += n;
  }
  return true;
}

std::string replace_invalid_utf8(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 16);
  size_t pos = 0, subpart = 0;
  while (pos < text.size()) {
    const size_t n = sequence_length(text, pos, subpart);
    if (n > 0) {
      out.append(text.substr(pos, n));
      pos += n;
    } else {
      out.append("\xEF\xBF\xBD");
      pos += subpart;
    }
  }
  return out;
}

char32_t next_code_point(std::string_view text, size_t& pos) {
  const auto byte = [&](size_t i) { return static_cast<char32_t>(static_cast<unsigned char>(text[i])); };
  const char32_t lead = byte(pos);
  if (lead < 0x80) {
    pos += 1;
    return lead;
  }
  if (lead < 0xE0) {
    pos += 2;
    return ((lead & 0x1F) << 6) | (byte(pos - 1) & 0x3F);
  }
  if (lead < 0xF0) {
    pos += 3;
    return ((lead & 0x0F) << 12) | ((byte(pos - 2) & 0x3F) << 6) | (byte(pos - 1) & 0x3F);
  }
  pos += 4;
  return ((lead & 0x07) << 18) | ((byte(pos - 3) & 0x3F) << 12) | ((byte(pos - 2) & 0x3F) << 6) |
         (byte(pos - 1) & 0x3F);
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool to_nfc(std::string_view text, std::string& out) {
  bool inert = true;
  for (size_t pos = 0; pos < text.size() && inert;) inert = nfc_inert(next_code_point(text, pos));
  if (inert) return false;
  // Characters plain to tokenizers are starters that block reordering and composition there, so
  // the stretches between them are normalized on their own and they stay as they are.
  out.clear();
  size_t stretch = 0;
  for (size_t pos = 0; pos < text.size();) {
    const size_t start = pos;
    if (plain_for_tokenizers(next_code_point(text, pos))) {
      append_utf8proc_nfc(text.substr(stretch, start - stretch), out);
      out.append(text.substr(start, pos - start));
      stretch = pos;
    }
  }
  append_utf8proc_nfc(text.substr(stretch), out);
  return true;
}

bool is_white_space(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

const std::array<char32_t, 256>& byte_level_alphabet() {
  static const std::array<char32_t, 256> alphabet = make_byte_level_alphabet();
  return alphabet;
}

}  // namespace moeforge::data::unicode
