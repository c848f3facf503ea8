// defines: Tokenizer, load_tokenizer
//
// Text -> token ids for building datasets. Two tokenizers:
//  - "bpe": a Hugging Face tokenizer.json holding a byte-level BPE (GPT-2, Qwen, Llama 3 style).
//    encode() gives the ids that Python `tokenizers` gives for
//    `Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids`: added tokens written
//    in the text (e.g. "<|endoftext|>") become their ids, and nothing is ever prepended or appended.
//    Text that is not valid UTF-8 is first repaired as Python's
//    `bytes.decode("utf-8", errors="replace")` does (one U+FFFD per maximal ill-formed subpart).
//    decode() equals `tokenizers`' decode(ids, skip_special_tokens=False); decode(encode(x)) == x
//    for valid UTF-8 x that is NFC (for tokenizers with an NFC normalizer; Qwen's has one) when
//    the tokenizer adds no prefix space (Qwen's adds none).
//  - "byte": no file; ids 0..255 are the bytes themselves (any bytes, lossless) and 256 is the
//    end-of-document id, which decodes to nothing.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Thread-safe: many threads may encode with one tokenizer at once.
  virtual std::vector<int32_t> encode(std::string_view utf8_text) const = 0;
  // Throws std::out_of_range for an id outside [0, vocab_size()).
  virtual std::string decode(std::span<const int32_t> ids) const = 0;
  // Every id the tokenizer can produce is below this, added and special tokens included.
  virtual int64_t vocab_size() const = 0;
  // The end-of-document id that separates documents in a dataset (Qwen: <|endoftext|> = 151643);
  // for a tokenizer.json, the first special added token among <|endoftext|>, <|end_of_text|>,
  // </s>, <eos>; absent when there is none.
  virtual std::optional<int32_t> eod_id() const = 0;
  // "bpe:/path/tokenizer.json" or "byte".
  virtual std::string name() const = 0;
};

// The literal "byte" gives the byte tokenizer; anything else is the path of a tokenizer.json.
// Throws UserError for a missing file, malformed JSON, or an unsupported tokenizer configuration.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path_or_byte);

}  // namespace moeforge::data
