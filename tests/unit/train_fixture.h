// defines: kBin, write_text_dataset, write_config, read_json, read_metrics, without_timing, train
// (shared by the trainer tests)
#pragma once

#include "data/indexed_dataset.h"
#include "launch/train/metrics.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace moeforge::test {

inline const std::string kBin = moeforge_binary();

// mpirun as root, on one machine, with more ranks than cores.
inline const std::string kMpirun = std::string("env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                                               "OMPI_MCA_btl_vader_single_copy_mechanism=none timeout 300 ") +
                                   mpiexec() + " --oversubscribe";

// Pipeline stages: per-layer load balancing (the pooled Hugging Face loss spans all layers) and
// four layers so that PP=4 has one per stage.
inline const std::string kPipelineModel = " --set model.num_layers=4 --set model.moe_router_load_balancing_type=aux_loss";

inline double relative(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-30); }

// Documents of English-like text (bytes), varied by a small LCG so the model has something to learn.
inline void write_text_dataset(const std::string& prefix, int documents) {
  static const char* words[] = {"the", "expert", "router", "sends", "each", "token", "to", "four", "of", "sixty",
                                "experts", "and", "a", "shared", "one", "adds", "its", "gated", "output", "loss"};
  data::IndexedDatasetBuilder b(prefix, data::TokenDType::uint16);
  uint64_t state = 12345;
  for (int d = 0; d < documents; ++d) {
    std::string text;
    const int n = 20 + static_cast<int>(state % 30);
    for (int w = 0; w < n; ++w) {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      text += words[(state >> 33) % 20];
      text += (w % 9 == 8) ? ". " : " ";
    }
    std::vector<int64_t> ids(text.begin(), text.end());
    b.add_document(ids);
  }
  b.finalize();
}

// The model mirrors MODEL in tests/oracles/train_oracle.py.
inline std::string write_config(const TempDir& dir, const std::string& extra = "") {
  write_text_dataset((dir.path() / "text").string(), 400);
  return dir.file("train.yaml", fmt::format(R"(
model:
  model_type: qwen2_moe
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 128
  vocab_size: 256
  rotary_base: 10000
  norm_epsilon: 1.0e-6
  add_qkv_bias: true
  untie_embeddings_and_output_weights: true
  num_experts: 8
  moe_ffn_hidden_size: 32
  moe_router_topk: 4
  moe_router_pre_softmax: true
  moe_router_load_balancing_type: hf_pooled_aux_loss
  moe_aux_loss_coeff: 0.01
  moe_shared_expert_intermediate_size: 64
  moe_shared_expert_gate: true
training:
  seq_length: 32
  micro_batch_size: 2
  global_batch_size: 8
  train_iters: 30
  lr: 2.0e-3
  min_lr: 2.0e-4
  lr_decay_style: cosine
  lr_warmup_iters: 3
  weight_decay: 0.1
  adam_beta2: 0.95
  clip_grad: 1.0
  deterministic: true  # the parity tests' setting (docs/training.md)
  eval_interval: 10
  eval_iters: 2
data:
  data_path: [{}/text]
  split: "90,10,0"
logging:
  run_dir: {}/run
hardware:
  peak_tflops: 1.0
  num_threads: 1  # ctest runs two tests at once on two cores
{})",
                                            dir.path().string(), dir.path().string(), extra));
}

// A JSON file the run wrote (report.json, comparison.json, environment.json).
inline nlohmann::json read_json(const std::filesystem::path& path) { return nlohmann::json::parse(std::ifstream(path)); }

inline std::vector<nlohmann::json> read_metrics(const std::filesystem::path& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

inline nlohmann::json without_timing(nlohmann::json j) {
  for (const auto& key : kTimingMetricKeys) j.erase(std::string(key));
  return j;
}

inline std::string train(const std::string& config, const std::string& args = "") {
  const auto r = run_command(kBin + " train " + config + " " + args);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  return r.output;
}

}  // namespace moeforge::test
