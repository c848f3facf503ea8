// `moeforge forward --checkpoint DIR --tokens IDS.json [--out FILE.safetensors]`: runs a Hugging
// Face checkpoint on token ids, prints the next-token loss and writes the logits, so a user can
// check a checkpoint against another implementation.
#include "launch/commands/commands.h"

#include "core/base/errors.h"
#include "core/files/safetensors.h"
#include "launch/train/sharded_checkpoint.h"
#include "moe/hf_checkpoint.h"
#include "moe/model_loss.h"
#include "moe/moe_layer.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <fstream>
#include <iostream>

namespace moeforge {

int run_forward(const ForwardOptions& o) {
  std::ifstream in(o.tokens_path);
  if (!in) fail_user("cannot open --tokens {}", o.tokens_path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail_user("{}: invalid JSON: {}", o.tokens_path, e.what());
  }
  if (j.is_array() && !j.empty() && j[0].is_number_integer()) j = nlohmann::json::array({j});  // one sequence
  // nlohmann converts 1.5 to 1 silently: every id must be a JSON integer.
  for (const auto& row : j.is_array() ? j : nlohmann::json::array()) {
    for (const auto& t : row.is_array() ? row : nlohmann::json::array()) {
      if (!t.is_number_integer()) fail_user("{}: token id {} is not an integer", o.tokens_path, t.dump());
    }
  }
  std::vector<std::vector<int64_t>> rows;
  try {
    rows = j.get<std::vector<std::vector<int64_t>>>();
  } catch (const nlohmann::json::exception&) {
    fail_user("{}: expected a list of token ids, or a list of equally long lists", o.tokens_path);
  }
  if (rows.empty() || rows[0].size() < 2) fail_user("{}: give at least one sequence of two or more tokens", o.tokens_path);
  if (is_sharded_checkpoint(o.checkpoint)) {
    fail_user("{} is a sharded training checkpoint (one shard per pipeline stage and EP rank). Make it one Hugging "
              "Face checkpoint first: moeforge convert {} WHOLE_DIR --format whole, then --checkpoint "
              "WHOLE_DIR/iter_*.",
              o.checkpoint, o.checkpoint);
  }
  auto loaded = moe::load_hf_checkpoint(o.checkpoint);
  const int64_t B = static_cast<int64_t>(rows.size()), S = static_cast<int64_t>(rows[0].size());
  std::vector<int64_t> flat;
  for (size_t r = 0; r < rows.size(); ++r) {
    if (static_cast<int64_t>(rows[r].size()) != S) fail_user("{}: sequence {} has {} tokens, the first has {}", o.tokens_path, r, rows[r].size(), S);
    for (auto t : rows[r]) {
      if (t < 0 || t >= loaded.config.padded_vocab_size()) {
        fail_user("{}: token id {} is outside the vocabulary of {} ids", o.tokens_path, t, loaded.config.padded_vocab_size());
      }
      flat.push_back(t);
    }
  }
  torch::NoGradGuard no_grad;
  const auto tokens = torch::tensor(flat, torch::kInt64).view({B, S});
  const auto positions = torch::arange(S, torch::kInt64).unsqueeze(0).expand({B, S});
  const auto out = loaded.model->forward(tokens, positions);
  const auto labels = torch::cat({tokens.narrow(1, 1, S - 1), torch::zeros({B, 1}, torch::kInt64)}, 1);
  const auto mask = torch::cat({torch::ones({B, S - 1}), torch::zeros({B, 1})}, 1);
  const auto loss = moe::model_loss(loaded.config, out, labels, mask);
  std::cout << fmt::format("{} sequence(s) x {} tokens: lm loss {:.6f}, aux loss {:.6f}, loss {:.6f}\n", B, S,
                           loss.lm.item<double>(), loss.aux.item<double>(), loss.total.item<double>());
  if (!o.out_path.empty()) {
    save_safetensors(o.out_path, {{"logits", out.logits_BSV.contiguous()}}, {{"format", "pt"}});
    spdlog::info("wrote logits [{}, {}, {}] to {}", B, S, out.logits_BSV.size(2), o.out_path);
  }
  return 0;
}

}  // namespace moeforge
