#include "launch/train/train_state.h"

#include "core/base/errors.h"
#include "core/config/config.h"
#include "core/files/file_names.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <charconv>
#include <fstream>
#include <limits>

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge {

namespace {

constexpr const char* kMaxSamplesText = "2^53 = 9007199254740992, more than any run counts";  // kMaxSamples

// Reads the fields of one JSON object, adding a line to `problems` for each one that is missing
// or of another type (nlohmann's own messages do not name the key).
class Fields {
 public:
  Fields(const json& object, std::string where, std::vector<std::string>& problems)
      : object_(object), where_(std::move(where)), problems_(problems) {
    if (!object_.is_object()) problems_.push_back(fmt::format("{} must be a JSON object, got {}", object_name(), object_.dump()));
  }

  int64_t whole(const char* key) {
    const json* v = find(key);
    if (!v) return 0;
    // An unsigned number beyond int64 would wrap to a negative one: it is out of range, not of another type.
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      problems_.push_back(fmt::format("{} is {}, above {}", name(key), v->dump(), kMaxSamplesText));
      return 0;
    }
    if (v->is_number_integer()) return v->get<int64_t>();
    problems_.push_back(fmt::format("{} must be a whole number, got {}", name(key), v->dump()));
    return 0;
  }

  std::string text(const char* key) {
    const json* v = find(key);
    if (v && !v->is_string()) problems_.push_back(fmt::format("{} must be a string, got {}", name(key), v->dump()));
    return v && v->is_string() ? v->get<std::string>() : "";
  }

  bool flag(const char* key, bool absent) {
    if (!object_.is_object() || !object_.contains(key)) return absent;
    const json& v = object_[key];
    if (!v.is_boolean()) problems_.push_back(fmt::format("{} must be true or false, got {}", name(key), v.dump()));
    return v.is_boolean() && v.get<bool>();
  }

 private:
  const json* find(const char* key) {
    if (!object_.is_object()) return nullptr;
    if (!object_.contains(key)) {
      problems_.push_back(fmt::format("{} is missing", name(key)));
      return nullptr;
    }
    return &object_[key];
  }
  std::string name(const char* key) const { return fmt::format("\"{}{}\"", where_, key); }
  std::string object_name() const {
    return where_.empty() ? "the file" : fmt::format("\"{}\"", where_.substr(0, where_.size() - 1));
  }

  const json& object_;
  std::string where_;  // "" or "datasets[1]."
  std::vector<std::string>& problems_;
};

std::optional<std::vector<data::DatasetIdentity>> read_datasets(const json& j, std::vector<std::string>& problems) {
  if (!j.is_object() || !j.contains("datasets")) return std::nullopt;
  const json& list = j["datasets"];
  if (!list.is_array()) {
    problems.push_back(fmt::format("\"datasets\" must be a list, got {}", list.dump()));
    return std::nullopt;
  }
  std::vector<data::DatasetIdentity> out;
  for (size_t i = 0; i < list.size(); ++i) {
    Fields f(list[i], fmt::format("datasets[{}].", i), problems);
    data::DatasetIdentity d{f.text("prefix"), f.whole("idx_bytes"), 0, f.whole("bin_bytes")};
    const std::string hash = f.text("idx_hash");
    const auto [end, ec] = std::from_chars(hash.data(), hash.data() + hash.size(), d.idx_hash, 16);
    if (hash.size() != 16 || ec != std::errc() || end != hash.data() + hash.size()) {
      problems.push_back(fmt::format("\"datasets[{}].idx_hash\" must be 16 hexadecimal digits, got \"{}\"", i, hash));
    }
    out.push_back(std::move(d));
  }
  return out;
}

// The counters' ranges, and the iteration against the directory it is in (the tracker names the
// directory, so the tracker is checked too): iteration -4 would save iter_-000002 and then over
// iter_0000004. Counts above 2^53 no run reaches; below that bound the loader's sample indices and
// the schedule's steps (each adding at most training.train_iters x global batch, bounded the same
// way by validate_config) cannot overflow, and every count is exact as a double (the schedule's
// arithmetic, metrics.jsonl).
void check_ranges(const SavedTrainState& saved, const fs::path& dir, std::vector<std::string>& problems) {
  const TrainState& s = saved.state;
  auto within = [&](const char* key, int64_t value, int64_t low) {
    if (value < low) problems.push_back(fmt::format("\"{}\" is {}, below {}", key, value, low));
    if (value > kMaxSamples) problems.push_back(fmt::format("\"{}\" is {}, above {}", key, value, kMaxSamplesText));
  };
  within("iteration", s.iteration, 0);
  within("consumed_train_samples", s.consumed_train_samples, s.iteration);  // a sample per iteration at least
  within("consumed_valid_samples", s.consumed_valid_samples, 0);
  within("lr_num_steps", s.lr_num_steps, 0);
  within("skipped_iterations", s.skipped_iterations, 0);
  within("optimizer_steps", saved.optimizer_steps, 0);
  auto at_most = [&](const char* key, int64_t value, const char* bound_key, int64_t bound, const char* why) {
    if (value > bound) problems.push_back(fmt::format("\"{}\" ({}) exceeds \"{}\" ({}){}", key, value, bound_key, bound, why));
  };
  at_most("skipped_iterations", s.skipped_iterations, "iteration", s.iteration, "");
  at_most("optimizer_steps", saved.optimizer_steps, "iteration", s.iteration, "");
  at_most("lr_num_steps", s.lr_num_steps, "consumed_train_samples", s.consumed_train_samples,
          ": the LR schedule counts the samples of successful updates only");
  const auto named = checkpoint_iteration(dir);
  if (named && *named != s.iteration) {
    problems.push_back(fmt::format("\"iteration\" is {}, but the directory is {} (iteration {})", s.iteration,
                                   dir.filename().string(), *named));
  }
}

}  // namespace

json train_state_json(const TrainState& s, int64_t optimizer_steps, bool bf16) {
  json j = {{"iteration", s.iteration},
            {"consumed_train_samples", s.consumed_train_samples},
            {"consumed_valid_samples", s.consumed_valid_samples},
            {"lr_num_steps", s.lr_num_steps},
            {"optimizer_steps", optimizer_steps},
            {"skipped_iterations", s.skipped_iterations},
            {"bf16", bf16}};
  if (!s.datasets) return j;
  j["datasets"] = json::array();
  for (const auto& d : *s.datasets) {
    j["datasets"].push_back({{"prefix", d.prefix},
                             {"idx_bytes", d.idx_bytes},
                             {"idx_hash", fmt::format("{:016x}", d.idx_hash)},
                             {"bin_bytes", d.bin_bytes}});
  }
  return j;
}

SavedTrainState read_train_state(const std::string& dir) {
  const fs::path file = fs::path(dir) / files::kTrainerState;
  std::ifstream in(file);
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail_user("{}: unreadable ({}). Point --load at another checkpoint.", file.string(), e.what());
  }
  std::vector<std::string> problems;
  Fields f(j, "", problems);
  SavedTrainState out;
  TrainState& s = out.state;
  s.iteration = f.whole("iteration");
  s.consumed_train_samples = f.whole("consumed_train_samples");
  s.consumed_valid_samples = f.whole("consumed_valid_samples");
  s.lr_num_steps = f.whole("lr_num_steps");
  s.skipped_iterations = f.whole("skipped_iterations");
  out.optimizer_steps = f.whole("optimizer_steps");
  out.bf16 = f.flag("bf16", false);
  s.datasets = read_datasets(j, problems);
  if (problems.empty()) check_ranges(out, file.parent_path(), problems);  // only values that were read
  if (problems.empty()) return out;
  fail_user("{}: the checkpoint's state is damaged: {}. Point --load at another checkpoint (or restore this file from a "
            "backup).",
            file.string(), fmt::join(problems, "; "));
}

std::optional<int64_t> checkpoint_iteration(const fs::path& dir) {
  const std::string name = (dir.filename().empty() ? dir.parent_path() : dir).filename().string();
  constexpr std::string_view kPrefix = "iter_";
  if (!name.starts_with(kPrefix) || name.size() < kPrefix.size() + 7) return std::nullopt;
  int64_t iteration = 0;
  const char *first = name.data() + kPrefix.size(), *last = name.data() + name.size();
  if (*first == '-' || *first == '+') return std::nullopt;
  const auto [end, ec] = std::from_chars(first, last, iteration);
  if (ec != std::errc() || end != last) return std::nullopt;
  return iteration;
}

}  // namespace moeforge
