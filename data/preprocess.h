// defines: PreprocessOptions, PreprocessReport, preprocess_jsonl, document_prefix
//
// Megatron's tools/preprocess_data.py in C++: JSON lines -> token ids -> an indexed dataset
// named <output_prefix>_<json_key>_document.{bin,idx}, byte-identical to Megatron's for the
// same tokenizer. Multi-threaded; the dataset appears under its final name only when complete.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::data {

struct PreprocessOptions {
  std::string input;  // JSON lines, one document per line
  std::string json_key = "text";
  std::string tokenizer;  // tokenizer.json, or "byte"
  std::string output_prefix;
  bool append_eod = false;
  int workers = 0;              // 0 = hardware threads
  bool skip_bad_lines = false;  // false: the first bad line fails the run (nothing is written)
  double progress_seconds = 5;  // how often progress is logged
};

struct BadLine {
  int64_t line = 0;  // 1-based
  std::string reason;
};

struct PreprocessReport {
  std::string output_prefix;  // <output_prefix>_<json_key>_document
  int64_t documents = 0;
  int64_t tokens = 0;
  int64_t bytes = 0;
  int64_t bad_lines = 0;
  std::vector<BadLine> first_bad_lines;  // up to 20
  double seconds = 0;
};

std::string document_prefix(const std::string& output_prefix, const std::string& json_key);

PreprocessReport preprocess_jsonl(const PreprocessOptions& options);

}  // namespace moeforge::data
