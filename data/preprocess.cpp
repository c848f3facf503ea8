#include "data/preprocess.h"

#include "core/base/errors.h"
#include "data/indexed_dataset.h"
#include "data/tokenizer/tokenizer.h"
#include "data/tokenizer/unicode_text.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

namespace moeforge::data {

namespace {

struct Line {
  int64_t number = 0;
  std::string text;
};

// The outcome of one line: its ids, or why it is bad.
struct Encoded {
  std::vector<int64_t> ids;
  bool bad = false;
  std::string reason;
};

Encoded encode_line(const Line& line, const PreprocessOptions& o, const Tokenizer& tok, int32_t eod) {
  Encoded e;
  if (line.text.empty()) {
    e.bad = true;
    e.reason = "empty line";
    return e;
  }
  if (!unicode::is_valid_utf8(line.text)) {
    e.bad = true;
    e.reason = "invalid UTF-8";
    return e;
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line.text);
  } catch (const nlohmann::json::exception& err) {
    e.bad = true;
    e.reason = fmt::format("invalid JSON ({})", err.what());
    return e;
  }
  if (!j.is_object() || !j.contains(o.json_key)) {
    e.bad = true;
    e.reason = fmt::format("no \"{}\" key", o.json_key);
    return e;
  }
  if (!j[o.json_key].is_string()) {
    e.bad = true;
    e.reason = fmt::format("\"{}\" is not a string", o.json_key);
    return e;
  }
  const auto ids = tok.encode(j[o.json_key].get_ref<const std::string&>());
  e.ids.assign(ids.begin(), ids.end());
  // As Megatron: the EOD goes only after a non-empty document.
  if (o.append_eod && !e.ids.empty()) e.ids.push_back(eod);
  return e;
}

}  // namespace

std::string document_prefix(const std::string& output_prefix, const std::string& json_key) {
  return fmt::format("{}_{}_document", output_prefix, json_key);
}

PreprocessReport preprocess_jsonl(const PreprocessOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  if (std::filesystem::is_directory(o.input)) {
    fail_user("--input {} is a directory; name one JSON-lines file (run once per file, then `moeforge data merge`).",
              o.input);
  }
  std::ifstream in(o.input, std::ios::binary);
  if (!in) fail_user("cannot open --input {}: {}", o.input, std::strerror(errno));
  const auto total_bytes = static_cast<double>(std::filesystem::file_size(o.input));
  const auto tok = load_tokenizer(o.tokenizer);
  int32_t eod = -1;
  if (o.append_eod) {
    if (!tok->eod_id()) fail_user("--append-eod: the tokenizer {} has no end-of-document token", tok->name());
    eod = *tok->eod_id();
  }
  PreprocessReport report;
  report.output_prefix = document_prefix(o.output_prefix, o.json_key);
  IndexedDatasetBuilder builder(report.output_prefix, optimal_dtype(tok->vocab_size()));
  const int workers = o.workers > 0 ? o.workers : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  constexpr size_t kLinesPerWorker = 256;

  auto last_note = start;
  int64_t line_number = 0;
  std::vector<Line> lines;
  while (in) {
    lines.clear();
    for (size_t k = 0; k < kLinesPerWorker * static_cast<size_t>(workers); ++k) {
      Line l;
      if (!std::getline(in, l.text)) break;
      l.number = ++line_number;
      report.bytes += static_cast<int64_t>(l.text.size()) + 1;
      if (!l.text.empty() && l.text.back() == '\r') l.text.pop_back();
      lines.push_back(std::move(l));
    }
    // Each worker encodes a contiguous slice; results are written in input order.
    std::vector<std::future<std::vector<Encoded>>> slices;
    const size_t per = (lines.size() + static_cast<size_t>(workers) - 1) / static_cast<size_t>(workers);
    for (size_t begin = 0; begin < lines.size(); begin += per) {
      const size_t end = std::min(lines.size(), begin + per);
      slices.push_back(std::async(std::launch::async, [&, begin, end] {
        std::vector<Encoded> out;
        for (size_t k = begin; k < end; ++k) out.push_back(encode_line(lines[k], o, *tok, eod));
        return out;
      }));
    }
    size_t k = 0;
    for (auto& slice : slices) {
      for (auto& e : slice.get()) {
        const Line& l = lines[k++];
        if (e.bad) {
          ++report.bad_lines;
          if (report.first_bad_lines.size() < 20) report.first_bad_lines.push_back({l.number, e.reason});
          if (!o.skip_bad_lines) {
            fail_user("{}:{}: {}. Nothing was written. Fix the line, or pass --skip-bad-lines to skip such lines.",
                      o.input, l.number, e.reason);
          }
          continue;
        }
        if (!e.ids.empty()) builder.add_item(e.ids);
        builder.end_document();
        ++report.documents;
        report.tokens += static_cast<int64_t>(e.ids.size());
      }
    }
    const auto now = std::chrono::steady_clock::now();
    if (now - last_note > std::chrono::duration<double>(o.progress_seconds)) {
      const double t = std::chrono::duration<double>(now - start).count();
      const double done = static_cast<double>(report.bytes) / std::max(total_bytes, 1.0);
      spdlog::info("preprocess: {} documents ({:.0f}/s), {} tokens ({:.0f}/s), {:.1f} % of {}, ETA {:.0f} s",
                   report.documents, static_cast<double>(report.documents) / t, report.tokens,
                   static_cast<double>(report.tokens) / t, 100.0 * done, o.input, t / std::max(done, 1e-9) - t);
      last_note = now;
    }
  }
  builder.finalize();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace moeforge::data
