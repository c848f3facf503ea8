#include "data/tokenizer/tokenizer_json.h"

#include "core/base/errors.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>

namespace moeforge::data {
namespace {

using nlohmann::json;

// The one question every rejection answers: what this file says, and what would work instead.
constexpr const char* kSupported =
    "moeforge reads byte-level BPE tokenizers (GPT-2, Qwen, Llama 3 style): normalizer null or NFC, "
    "pre_tokenizer ByteLevel or a Sequence of Split (Isolated) then ByteLevel, model BPE, decoder "
    "ByteLevel";

// The member `key` of an object, or null when absent (without copying the often large value).
const json& member(const json& object, const char* key) {
  static const json null_value;
  const auto it = object.find(key);
  return it == object.end() ? null_value : *it;
}

class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}

  TokenizerSpec read() {
    if (std::filesystem::is_directory(path_)) {
      fail_user("tokenizer path {} is a directory; give the tokenizer.json file in it", path_);
    }
    std::ifstream in(path_);
    if (!in) {
      fail_user("tokenizer file {} does not exist or cannot be read; give the path of a Hugging "
                "Face tokenizer.json, or `byte` for the byte-level tokenizer",
                path_);
    }
    json root;
    try {
      root = json::parse(in);
    } catch (const json::exception& e) {
      fail_user("{} is not valid JSON ({}); give an intact Hugging Face tokenizer.json", path_, e.what());
    }
    if (!root.is_object()) fail_user("{} is not a tokenizer.json (no JSON object at the top)", path_);
    TokenizerSpec spec;
    spec.path = path_;
    try {
      for (const char* key : {"truncation", "padding"}) {
        if (!member(root, key).is_null()) {
          fail_user("{}: `{}` is set; moeforge tokenizes whole documents, set it to null", path_, key);
        }
      }
      read_normalizer(member(root, "normalizer"), spec);
      read_pre_tokenizer(member(root, "pre_tokenizer"), spec);
      read_decoder(member(root, "decoder"));
      read_model(member(root, "model"), spec);
      read_added_tokens(member(root, "added_tokens"), spec);
    } catch (const json::exception& e) {
      fail_user("{}: unexpected field type ({}); the file does not follow the tokenizer.json format",
                path_, e.what());
    }
    return spec;
  }

 private:
  [[noreturn]] void unsupported(const std::string& field, const json& value) const {
    fail_user("{}: unsupported {} {}; {}", path_, field, value.dump(), kSupported);
  }

  int32_t checked_id(const json& id, const std::string& token) const {
    const auto value = id.get<int64_t>();
    if (value < 0 || value > INT32_MAX) {
      fail_user("{}: token \"{}\" has id {}, outside [0, 2^31); the file is corrupt", path_, token, value);
    }
    return static_cast<int32_t>(value);
  }

  static std::string type_of(const json& node) { return node.is_object() ? node.value("type", "") : ""; }

  void read_normalizer(const json& node, TokenizerSpec& spec) const {
    if (node.is_null()) return;
    const json steps = type_of(node) == "Sequence" ? node.at("normalizers") : json::array({node});
    for (const json& step : steps) {
      if (type_of(step) != "NFC") unsupported("normalizer", step);
      spec.nfc = true;  // NFC twice is NFC once
    }
  }

  void read_pre_tokenizer(const json& node, TokenizerSpec& spec) const {
    const json steps = type_of(node) == "Sequence" ? node.at("pretokenizers") : json::array({node});
    if (steps.empty() || type_of(steps.back()) != "ByteLevel") {
      fail_user("{}: pre_tokenizer {} does not end with ByteLevel; {}", path_, node.dump(), kSupported);
    }
    for (size_t i = 0; i + 1 < steps.size(); ++i) {
      const json& step = steps[i];
      if (type_of(step) != "Split") unsupported("pre_tokenizer step", step);
      if (step.value("behavior", "") != "Isolated" || step.value("invert", false)) {
        fail_user("{}: Split pre-tokenizer with behavior {} and invert {} is not supported; moeforge "
                  "supports behavior Isolated with invert false",
                  path_, member(step, "behavior").dump(), step.value("invert", false));
      }
      const json& pattern = step.at("pattern");
      if (pattern.contains("Regex")) {
        spec.splits.push_back({pattern.at("Regex").get<std::string>(), false});
      } else if (pattern.contains("String")) {
        spec.splits.push_back({pattern.at("String").get<std::string>(), true});
      } else {
        unsupported("Split pattern", pattern);
      }
    }
    const json& byte_level = steps.back();
    spec.add_prefix_space = byte_level.value("add_prefix_space", true);  // tokenizers' defaults
    spec.byte_level_regex = byte_level.value("use_regex", true);
  }

  void read_decoder(const json& node) const {
    if (type_of(node) != "ByteLevel") unsupported("decoder", node);
  }

  void read_model(const json& model, TokenizerSpec& spec) const {
    if (!model.is_object()) fail_user("{}: no `model` object; {}", path_, kSupported);
    const json& type = member(model, "type");
    if (!type.is_null() && type != "BPE") unsupported("model type", type);
    if (!model.contains("merges") || !model.contains("vocab")) {
      fail_user("{}: the model has no `vocab` and `merges`; {}", path_, kSupported);
    }
    const json& dropout = member(model, "dropout");
    if (!dropout.is_null() && dropout.get<double>() != 0.0) {
      fail_user("{}: model.dropout is {}; BPE dropout makes tokenization random, set it to null",
                path_, dropout.dump());
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      const json& affix = member(model, key);
      if (!affix.is_null() && !affix.get<std::string>().empty()) unsupported(std::string("model.") + key, affix);
    }
    if (model.value("byte_fallback", false)) {
      fail_user("{}: model.byte_fallback is true; it is for SentencePiece-style BPE over characters, "
                "which moeforge does not support (byte-level BPE never needs it)",
                path_);
    }
    const json& unk = member(model, "unk_token");
    if (!unk.is_null()) spec.unk_token = unk.get<std::string>();
    spec.fuse_unk = model.value("fuse_unk", false);
    spec.ignore_merges = model.value("ignore_merges", false);

    const json& vocab = model.at("vocab");
    spec.vocab.reserve(vocab.size());
    for (const auto& [token, id] : vocab.items()) spec.vocab.emplace_back(token, checked_id(id, token));
    const json& merges = model.at("merges");
    spec.merges.reserve(merges.size());
    for (const json& merge : merges) {
      if (merge.is_array() && merge.size() == 2) {
        spec.merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
        continue;
      }
      const std::string line = merge.get<std::string>();
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        fail_user("{}: merge \"{}\" is not two tokens separated by one space", path_, line);
      }
      spec.merges.emplace_back(line.substr(0, space), line.substr(space + 1));
    }
  }

  void read_added_tokens(const json& tokens, TokenizerSpec& spec) const {
    if (tokens.is_null()) return;
    for (const json& token : tokens) {
      AddedTokenSpec added;
      added.content = token.at("content").get<std::string>();
      added.id = checked_id(token.at("id"), added.content);
      added.special = token.value("special", false);
      added.normalized = token.value("normalized", !added.special);  // tokenizers' default
      added.lstrip = token.value("lstrip", false);
      added.rstrip = token.value("rstrip", false);
      if (token.value("single_word", false)) {
        fail_user("{}: added token \"{}\" has single_word true, which moeforge does not support; "
                  "set it to false",
                  path_, added.content);
      }
      if (!added.content.empty()) spec.added_tokens.push_back(std::move(added));  // as tokenizers
    }
  }

  std::string path_;
};

}  // namespace

TokenizerSpec read_tokenizer_json(const std::string& path) { return Reader(path).read(); }

}  // namespace moeforge::data
