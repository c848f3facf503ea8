#include "data/blend.h"

#include "core/base/errors.h"

#include <fmt/format.h>

#include <charconv>
#include <numeric>
#include <regex>
#include <sstream>

namespace moeforge::data {

std::array<double, 3> parse_split(const std::string& split) {
  // Megatron takes every run of digits and dots as a number: "99,1,0", "99/1/0" and "99 1 0" agree.
  // It silently drops anything else ("nan,1,1" trains as "1,1"; "1e400,1,1" reads as four numbers):
  // here the separators are a comma, a slash or white space, and any other character is refused.
  if (split.find('-') != std::string::npos) {
    fail_user("data.split \"{}\": proportions cannot be negative. Write proportions like \"99,1,0\".", split);
  }
  const auto bad = split.find_first_not_of("0123456789., /\t");
  if (bad != std::string::npos) {
    fail_user("data.split \"{}\": character {} ('{}') is neither a digit, a dot nor a separator (comma, slash, "
              "space). Write plain proportions like \"99,1,0\".",
              split, bad + 1, split[bad]);
  }
  static const std::regex number(R"([.0-9]+)");
  std::vector<double> values;
  for (auto it = std::sregex_iterator(split.begin(), split.end(), number); it != std::sregex_iterator(); ++it) {
    const std::string token = it->str();
    double v = 0;
    auto [end, ec] = std::from_chars(token.data(), token.data() + token.size(), v);
    if (ec != std::errc() || end != token.data() + token.size()) {
      fail_user("data.split \"{}\": `{}` is not a number. Write proportions like \"99,1,0\".", split, token);
    }
    values.push_back(v);
  }
  if (values.size() > 3) {
    fail_user("data.split \"{}\" has {} numbers; it takes at most 3 (train, valid, test).", split, values.size());
  }
  values.resize(3, 0.0);
  const double sum = std::accumulate(values.begin(), values.end(), 0.0);
  if (!(sum > 0)) fail_user("data.split \"{}\" sums to 0: give the train split a positive share, e.g. \"99,1,0\".", split);
  return {values[0] / sum, values[1] / sum, values[2] / sum};
}

DatasetBlend parse_blend(const std::vector<std::string>& data_path) {
  std::vector<std::string> tokens;
  for (const auto& entry : data_path) {
    std::istringstream words(entry);
    for (std::string w; words >> w;) tokens.push_back(w);
  }
  DatasetBlend blend;
  if (tokens.size() % 2 == 1) {
    blend.prefixes = tokens;
    return blend;
  }
  std::vector<double> weights;
  std::vector<std::string> prefixes;
  size_t numeric = 0;
  for (size_t i = 0; i < tokens.size(); i += 2) {
    double w = 0;
    const std::string& t = tokens[i];
    auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), w);
    const bool is_number = ec == std::errc() && end == t.data() + t.size();
    numeric += is_number ? 1 : 0;
    weights.push_back(w);
    prefixes.push_back(tokens[i + 1]);
  }
  if (numeric == 0) {  // an even number of plain prefixes
    blend.prefixes = tokens;
    return blend;
  }
  if (numeric != weights.size()) {
    fail_user("data.data_path mixes weights and prefixes: [{}]. Write either prefixes only, or "
              "weight-prefix pairs [w1, prefix1, w2, prefix2, ...].",
              fmt::join(tokens, ", "));
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!(weights[i] >= 0)) fail_user("data.data_path: weight {} of `{}` is negative.", weights[i], prefixes[i]);
  }
  if (!(std::accumulate(weights.begin(), weights.end(), 0.0) > 0)) {
    fail_user("data.data_path: all blend weights are 0; give at least one dataset a positive weight.");
  }
  blend.prefixes = std::move(prefixes);
  blend.weights = std::move(weights);
  return blend;
}

void validate_data_config(const DataConfig& data) {
  parse_split(data.split);
  parse_blend(data.data_path);
}

}  // namespace moeforge::data
