// defines: is_valid_utf8, replace_invalid_utf8, to_nfc, is_white_space, byte_level_alphabet
//
// The Unicode pieces the BPE tokenizer needs, each matching what Hugging Face `tokenizers` does,
// so that our ids equal its ids byte for byte.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace moeforge::data::unicode {

bool is_valid_utf8(std::string_view bytes);

// Replaces every ill-formed part of `bytes` with U+FFFD, one per maximal subpart (Unicode's
// recommended practice, which is what both Python's bytes.decode("utf-8", "replace") and Rust's
// String::from_utf8_lossy do): "\xe4\xb8" -> one U+FFFD, "\xff\xfe" -> two, surrogates and
// overlong forms rejected byte by byte.
std::string replace_invalid_utf8(std::string_view bytes);

// Canonical composition (NFC) of valid UTF-8 text as tokenizers computes it, with Unicode 9.0's
// character data. Returns false and leaves `out` untouched when the text is already NFC by a
// cheap scan (ASCII, Latin, CJK, kana and Hangul syllables); otherwise writes the composed text
// to `out` and returns true.
bool to_nfc(std::string_view text, std::string& out);

// Decodes the code point at `pos` of valid UTF-8 and advances `pos` past it.
char32_t next_code_point(std::string_view text, size_t& pos);
void append_utf8(std::string& out, char32_t cp);

// Unicode White_Space (what Rust's regex `\s` means): used for added tokens' lstrip/rstrip.
bool is_white_space(char32_t cp);

// GPT-2's byte-level alphabet: byte b stands for the code point byte_level_alphabet()[b], so that
// every byte is a printable character ('Ġ' for space, 'Ċ' for newline).
const std::array<char32_t, 256>& byte_level_alphabet();

}  // namespace moeforge::data::unicode
