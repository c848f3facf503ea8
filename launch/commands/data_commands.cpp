#include "launch/commands/data_commands.h"

#include "core/config/config_loader.h"
#include "core/base/errors.h"
#include "core/config/logging.h"
#include "data/datasets.h"
#include "data/indexed_dataset.h"
#include "data/tokenizer/tokenizer.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <iostream>

namespace moeforge {

namespace {

// A sample's input tokens as text. An id beyond the tokenizer's vocabulary means the dataset was
// made with another tokenizer: said so, instead of decoding it into something misleading.
std::string sample_text(const data::Tokenizer& tokenizer, const std::vector<int64_t>& tokens, int64_t index,
                        const std::string& name) {
  std::vector<int32_t> ids;
  ids.reserve(tokens.size());
  for (const int64_t id : tokens) {
    if (id < 0 || id >= tokenizer.vocab_size()) {
      fail_user("--decode {}: sample {} holds token id {}, outside the tokenizer's {} ids. Decode with the tokenizer "
                "the dataset was made with (data.tokenizer_model, or what `data preprocess --tokenizer` was given).",
                name, index, id, tokenizer.vocab_size());
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  return tokenizer.decode(ids);
}

// One line, quoted, every control character and newline escaped: where the text starts and ends
// (spaces, an end-of-document token) stays visible.
std::string json_string(const std::string& text) {
  return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

int run_data_inspect(const DataInspectOptions& o) {
  const data::IndexedDataset d(o.prefix);  // validates every invariant, or throws naming the problem
  const auto& lengths = d.sequence_lengths();
  int64_t tokens = 0, shortest = 0, longest = 0;
  if (!lengths.empty()) {
    shortest = *std::min_element(lengths.begin(), lengths.end());
    longest = *std::max_element(lengths.begin(), lengths.end());
  }
  for (auto l : lengths) tokens += l;
  const double mean = lengths.empty() ? 0.0 : static_cast<double>(tokens) / static_cast<double>(lengths.size());
  const int64_t max_id = d.token_id_range().max;
  if (o.json) {
    std::cout << nlohmann::json{{"prefix", o.prefix},
                                {"dtype", data::dtype_name(d.dtype())},
                                {"sequences", d.num_sequences()},
                                {"documents", d.num_documents()},
                                {"tokens", tokens},
                                {"length_min", shortest},
                                {"length_mean", mean},
                                {"length_max", longest},
                                {"max_token_id", max_id},
                                {"multimodal", d.multimodal()},
                                {"valid", true}}
                     .dump(2)
              << "\n";
    return 0;
  }
  std::cout << fmt::format("dataset      {}\n", o.prefix);
  std::cout << fmt::format("dtype        {}\n", data::dtype_name(d.dtype()));
  std::cout << fmt::format("sequences    {}\n", d.num_sequences());
  std::cout << fmt::format("documents    {}\n", d.num_documents());
  std::cout << fmt::format("tokens       {}\n", tokens);
  std::cout << fmt::format("length       min {} / mean {:.1f} / max {}\n", shortest, mean, longest);
  std::cout << fmt::format("largest id   {}\n", max_id);
  std::cout << fmt::format("multimodal   {}\n", d.multimodal() ? "yes" : "no");
  std::cout << "validation   ok: header, document index, pointers and .bin size are consistent\n";
  return 0;
}

int run_data_samples(const DataSamplesOptions& o) {
  const LoadedConfig loaded = load_config(o.config_path, o.overrides);
  set_log_level(loaded.config.logging.log_level);
  size_t split = 3;
  for (size_t i = 0; i < 3; ++i) {
    if (o.split == data::split_name(static_cast<data::Split>(i))) split = i;
  }
  if (split == 3) fail_user("--split {}: expected train, valid or test", o.split);
  auto spec = data::dataset_spec_from_config(loaded.config);
  spec.build = {split == 0, split == 1, split == 2};  // the other splits may be empty: they are not asked for
  const auto datasets = data::build_datasets(spec);
  const auto& source = datasets[split];
  if (!source) fail_user("the {} split is empty for data.split \"{}\"", o.split, loaded.config.data.split);
  const auto tokenizer = o.decode.empty() ? nullptr : data::load_tokenizer(o.decode);
  const int64_t n = std::min(o.first, source->size());
  data::Sample s;
  nlohmann::json samples = nlohmann::json::array();
  for (int64_t i = 0; i < n; ++i) {
    source->get(i, s);
    const std::string text = tokenizer ? sample_text(*tokenizer, s.tokens, i, o.decode) : "";
    if (o.json) {
      samples.push_back({{"index", i},
                         {"tokens", s.tokens},
                         {"labels", s.labels},
                         {"loss_mask", s.loss_mask},
                         {"position_ids", s.position_ids}});
      if (tokenizer) samples.back()["text"] = text;
    } else {
      std::cout << fmt::format("sample {}: {}\n", i, fmt::join(s.tokens, " "));
      if (tokenizer) std::cout << fmt::format("text {}: {}\n", i, json_string(text));
    }
  }
  if (o.json) {
    // Replace: the byte tokenizer decodes any bytes, and a sample may cut a character in two.
    std::cout << nlohmann::json{{"split", o.split}, {"size", source->size()}, {"samples", samples}}.dump(
                     -1, ' ', false, nlohmann::json::error_handler_t::replace)
              << "\n";
  }
  return 0;
}

int run_data_merge(const DataMergeOptions& o) {
  if (o.inputs.empty()) fail_user("data merge needs at least one --input prefix");
  const data::IndexedDataset first(o.inputs.front());
  data::IndexedDatasetBuilder builder(o.output_prefix, first.dtype());
  for (const auto& prefix : o.inputs) {
    builder.add_index(prefix);
    spdlog::info("merged {} ({} sequences so far)", prefix, builder.num_sequences());
  }
  builder.finalize();
  spdlog::info("wrote {}.bin/.idx: {} sequences, {} tokens", o.output_prefix, builder.num_sequences(), builder.num_tokens());
  return 0;
}

int run_data_preprocess(const data::PreprocessOptions& o) {
  const auto r = data::preprocess_jsonl(o);
  for (const auto& bad : r.first_bad_lines) spdlog::warn("{}:{}: skipped: {}", o.input, bad.line, bad.reason);
  if (r.bad_lines > static_cast<int64_t>(r.first_bad_lines.size())) {
    spdlog::warn("... {} more bad lines skipped", r.bad_lines - static_cast<int64_t>(r.first_bad_lines.size()));
  }
  std::cout << fmt::format("wrote {}.bin/.idx: {} documents, {} tokens, {} bad lines skipped; {:.1f} s, {:.0f} "
                           "documents/s, {:.0f} tokens/s\n",
                           r.output_prefix, r.documents, r.tokens, r.bad_lines, r.seconds,
                           static_cast<double>(r.documents) / r.seconds, static_cast<double>(r.tokens) / r.seconds);
  return 0;
}

}  // namespace moeforge
