#include "launch/train/startup_checks.h"

#include "core/base/errors.h"
#include "core/optim/optimizer.h"
#include "core/model/rule_updated.h"
#include "core/files/safetensors.h"
#include "data/blend.h"
#include "data/gpt_dataset.h"
#include "data/index_cache.h"
#include "data/indexed_dataset.h"
#include "data/token_ids.h"
#include "launch/train/sharded_checkpoint.h"
#include "moe/moe_layer.h"
#include "parallel/layout/plan.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;

namespace moeforge {

namespace {

// Without the tracker a run starts fresh and would save over the iter_* checkpoints it finds. A
// run resuming a training checkpoint it was told to load (--load) is not starting fresh.
void refuse_untracked_checkpoints(const CheckpointConfig& k, bool resuming) {
  std::error_code ec;
  const fs::path save(k.save);
  if (k.save.empty() || k.overwrite || resuming || fs::exists(save / files::kTracker, ec) || !fs::is_directory(save, ec)) return;
  std::vector<std::string> found;
  for (const auto& entry : fs::directory_iterator(save, ec)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_directory(ec) && name.size() == files::iteration_dir(0).size() && name.rfind("iter_", 0) == 0 &&
        std::all_of(name.begin() + 5, name.end(), [](unsigned char c) { return std::isdigit(c); })) {
      found.push_back(name);
    }
  }
  if (found.empty()) return;
  std::sort(found.begin(), found.end());
  fail_user("checkpoint.save {} holds {} checkpoint director{} ({} .. {}) but no {} (a save killed before its "
            "tracker was written leaves this): this run would start from scratch and save over them. Resume the newest "
            "complete one with --load {}, or one of them with --load {}/{}, or set checkpoint.overwrite: true to start "
            "fresh anyway.",
            k.save, found.size(), found.size() > 1 ? "ies" : "y", found.front(), found.back(), files::kTracker, k.save,
            k.save, found.back());
}

}  // namespace

StartPoint start_point(const CheckpointConfig& k) {
  StartPoint start;
  if (!k.load.empty()) {
    start.checkpoint = find_checkpoint(k.load);
    if (!start.checkpoint) fail_user("{} holds no checkpoint yet. Remove checkpoint.load / --load to start fresh.", k.load);
  }
  refuse_untracked_checkpoints(k, start.checkpoint && start.checkpoint->resume);
  std::error_code ec;  // a save path that cannot exist (too long) has no tracker; check_output_dir names it
  start.from_save = !k.save.empty() && fs::exists(fs::path(k.save) / files::kTracker, ec) &&
                    !(start.checkpoint && start.checkpoint->resume);
  if (start.from_save) {
    if (start.checkpoint) {
      spdlog::info("checkpoint.save {} already holds a checkpoint: resuming it instead of starting again from {}", k.save,
                   start.checkpoint->dir);
    }
    start.checkpoint = find_checkpoint(k.save);
  }
  return start;
}

namespace {

// data.tokenizer_model names a tokenizer.json (load_tokenizer reads a file) or "byte". A path that
// is not there is refused even when nothing reads it (no EOD masking): it is a typo or a file this
// node does not see, and a run that is later set to mask EODs would stop on it.
void check_tokenizer_model(const std::string& model) {
  if (model.empty() || model == "byte") return;
  std::error_code ec;
  const auto status = fs::status(model, ec);
  if (fs::is_regular_file(status)) return;
  if (fs::is_directory(status)) {
    const fs::path inside = fs::path(model) / "tokenizer.json";
    fail_user("data.tokenizer_model {} is a directory, not a tokenizer.json file. Set it to {}.", model,
              fs::exists(inside, ec) ? inside.string() : "the model's tokenizer.json (the directory holds none)");
  }
  const std::string why = status.type() == fs::file_type::not_found ? "does not exist"
                          : ec                                       ? "cannot be read (" + ec.message() + ")"
                                                                     : "is not a regular file";
  fail_user("data.tokenizer_model {} {}. Set it to the path of the model's tokenizer.json as this node sees it, to "
            "\"byte\" for the byte tokenizer, or remove the key when neither data.eod_mask_loss nor "
            "data.reset_position_ids needs a tokenizer.",
            model, why);
}

// How a dataset's ids were shown to fit the vocabulary, and the largest: its dtype's bound, or the
// largest id a scan of its .bin found (now or cached; -1 when it holds none).
struct IdsFit {
  enum How { by_dtype, scanned, cached } how;
  int64_t largest;
};

// Every token id of `d` inside [0, the padded vocabulary): an id outside it stopped training at the
// first sample holding it (GPTDataset::get). The dtype decides without reading when it can.
IdsFit check_token_ids(const data::IndexedDataset& d, const ExperimentConfig& c) {
  const int64_t vocab = c.model.padded_vocab_size();
  if (const auto bound = data::unsigned_dtype_max(d.dtype()); bound && *bound < vocab) return {IdsFit::by_dtype, *bound};
  bool scanned = false;
  const auto ids = data::cached_token_id_range(d, data::index_cache_dir(c.data.data_cache_path, d.prefix()),
                                               c.parallel.distributed_timeout_minutes * 60.0, &scanned);
  const IdsFit fit{scanned ? IdsFit::scanned : IdsFit::cached, ids.max};
  if (ids.empty()) return fit;
  const std::string bin = data::bin_path(d.prefix());
  if (ids.min < 0) {
    fail_user("{}: {} holds token id {}, and token ids are never negative: the .bin is damaged or its .idx names "
              "another dtype ({}). Rebuild the dataset with moeforge data preprocess.",
              d.prefix(), bin, ids.min, data::dtype_name(d.dtype()));
  }
  if (ids.max >= vocab) {
    const std::string padded = vocab == c.model.vocab_size
                                   ? std::string()
                                   : fmt::format(", padded to {} by model.make_vocab_size_divisible_by {}", vocab,
                                                 c.model.make_vocab_size_divisible_by);
    fail_user("{}: the largest token id in {} is {}, outside the model's vocabulary (model.vocab_size {}{}): training "
              "would stop at the first sample holding it. Set model.vocab_size to at least {} if the model's "
              "tokenizer has that many ids; otherwise the data was made with another tokenizer: re-tokenize it with "
              "the model's.",
              d.prefix(), bin, ids.max, c.model.vocab_size, padded, ids.max + 1);
  }
  return fit;
}

// The dry run's line on the datasets' ids: what proved they fit, and how many were read.
struct IdsSummary {
  int datasets = 0, by_dtype = 0, scanned = 0, cached = 0;
  int64_t dtype_bound = -1, largest_found = -1;

  void add(const IdsFit& fit) {
    ++datasets;
    if (fit.how == IdsFit::by_dtype) {
      ++by_dtype;
      dtype_bound = std::max(dtype_bound, fit.largest);
      return;
    }
    ++(fit.how == IdsFit::scanned ? scanned : cached);
    largest_found = std::max(largest_found, fit.largest);
  }

  std::string describe(int64_t vocab) const {
    const char* dtype = dtype_bound > 255 ? "uint16" : "uint8";
    if (by_dtype == datasets) {
      return fmt::format("token ids < {} ({}) fit the vocabulary of {}, no scan needed", dtype_bound + 1, dtype, vocab);
    }
    std::vector<std::string> how;
    if (scanned) how.push_back(fmt::format("{} .bin scanned", scanned));
    if (cached) how.push_back(fmt::format("{} from the cache of an earlier scan", cached));
    if (by_dtype) how.push_back(fmt::format("{} bounded by {}, < {}", by_dtype, dtype, dtype_bound + 1));
    return fmt::format("largest token id {} fits the vocabulary of {} ({})", largest_found, vocab, fmt::join(how, ", "));
  }
};

}  // namespace

std::string check_data(const ExperimentConfig& c) {
  data::validate_data_config(c.data);
  check_tokenizer_model(c.data.tokenizer_model);
  if (c.data.data_path.empty()) fail_user("data.data_path is empty: name the Megatron dataset prefix(es) to train on.");
  const auto split = data::parse_split(c.data.split);
  const auto prefixes = data::parse_blend(c.data.data_path).prefixes;
  int64_t documents = 0;
  bool train = false;
  IdsSummary ids;
  for (const auto& prefix : prefixes) {
    const data::IndexedDataset d(prefix);  // maps and validates the index
    documents += d.num_documents();
    train = train || data::split_document_ranges(split, d.num_sequences())[0].has_value();
    ids.add(check_token_ids(d, c));
  }
  if (!train) fail_user("data.split '{}' gives the train split no documents: training needs some", c.data.split);
  return fmt::format("{} dataset(s), {} documents, indices valid; {}", prefixes.size(), documents,
                     ids.describe(c.model.padded_vocab_size()));
}

namespace {

// The longest relative path moeforge writes below an output directory, with room to spare: a
// sharded checkpoint's `iter_N.tmp-<pid>/mp_rank_00_SSS_EEE/model.safetensors.index.json.tmp-<pid>`
// (84), a TensorBoard file's `events.out.tfevents.<time>.<host>.<pid>` (up to about 100).
constexpr size_t kLongestBelow = 128;

// A path the kernel refuses (ENAMETOOLONG) was found out at the first save, an hour in.
void check_path_lengths(const char* key, const std::string& dir) {
  std::error_code ec;
  const fs::path path = fs::absolute(dir, ec);
  const std::string shown = dir.size() > 80 ? dir.substr(0, 80) + "..." : dir;
  for (const auto& part : path) {
    if (part.native().size() > NAME_MAX) {
      fail_user("{} {}: the name \"{}...\" has {} characters, above the {} a file name may have (NAME_MAX). Choose "
                "a shorter path.",
                key, shown, part.native().substr(0, 40), part.native().size(), NAME_MAX);
    }
  }
  if (path.native().size() + kLongestBelow >= PATH_MAX) {
    fail_user("{} {}: the path has {} characters; with the up to {} of the files moeforge writes below it, it would "
              "pass the {} a path may have (PATH_MAX). Choose a path shorter than {} characters.",
              key, shown, path.native().size(), kLongestBelow, PATH_MAX,
              PATH_MAX - kLongestBelow);
  }
}

}  // namespace

void check_output_dir(const char* key, const std::string& dir, bool create) {
  check_path_lengths(key, dir);
  // The same reasons either way: what creating the directory failed with, or would fail with.
  std::string why;
  std::error_code ec;
  fs::path probe = dir;
  if (create) {
    fs::create_directories(dir, ec);
    if (ec) why = ec.message();
  } else {
    probe = fs::absolute(dir, ec);
    while (!probe.empty() && probe != probe.root_path() && !fs::exists(probe, ec)) probe = probe.parent_path();
    if (!fs::is_directory(probe, ec)) why = std::strerror(ENOTDIR);
  }
  if (why.empty() && ::access(probe.c_str(), W_OK) != 0) why = std::strerror(errno);
  if (!why.empty()) fail_user("{} {} cannot be created or written ({}). Choose a writable directory.", key, dir, why);
}

namespace {

// Physical memory, or the cgroup (v2) limit when one is set and lower: what a container may use.
int64_t host_memory_bytes() {
  int64_t bytes = static_cast<int64_t>(::sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
  std::ifstream limit("/sys/fs/cgroup/memory.max");
  int64_t cgroup = 0;
  if (limit >> cgroup && cgroup > 0) bytes = std::min(bytes, cgroup);
  return bytes;
}

std::string gib(int64_t bytes) { return fmt::format("{:.1f} GiB", static_cast<double>(bytes) / (1024.0 * 1024 * 1024)); }

}  // namespace

int64_t usable_device_bytes(int64_t total) {
  // The plan counts tensors only. Beside them a GPU holds the CUDA context with cuBLAS and NCCL
  // workspaces (about 1 GiB on an H100 with NCCL initialised) and the caching allocator loses
  // some of what it reserves to fragmentation (a few percent in long runs): 5 % and 1.5 GiB.
  const int64_t headroom = total / 20 + (int64_t{3} << 29);
  return std::max<int64_t>(total - headroom, 0);
}

void check_memory_fits(const ExperimentConfig& c, const ParallelLayout& layout, std::optional<int64_t> device_total,
                       int64_t ranks_on_host) {
  const Plan plan = make_plan(c, "", layout);
  const auto worst = std::max_element(plan.stages.begin(), plan.stages.end(),
                                      [](const StagePlan& a, const StagePlan& b) { return a.peak_bytes < b.peak_bytes; });
  if (worst == plan.stages.end()) return;
  const int64_t need = worst->peak_bytes;
  const int64_t have = device_total ? usable_device_bytes(*device_total) : host_memory_bytes() / std::max<int64_t>(ranks_on_host, 1);
  if (need <= have) return;
  fail_user("the memory plan needs {} per rank (stage {}: weights {}, gradients {}, optimizer {}, the rest activations; "
            "`moeforge plan` itemises it), but {} {}. Use more pipeline stages or expert parallelism, "
            "parallel.use_distributed_optimizer, training.recompute_granularity: full or a smaller "
            "training.micro_batch_size, or check the model sizes for a typo.",
            gib(need), worst->stage, gib(worst->weight_bytes), gib(worst->gradient_bytes),
            gib(c.parallel.use_distributed_optimizer ? worst->optimizer_bytes_distributed : worst->optimizer_bytes),
            device_total ? "the device has" : "this host has",
            device_total ? fmt::format("{} of its {} for tensors (the rest is kept for the CUDA context, library "
                                       "workspaces and the caching allocator's fragmentation)", gib(have), gib(*device_total))
                         : fmt::format("{}{}", gib(host_memory_bytes()),
                                       ranks_on_host > 1 ? fmt::format(" for its {} ranks ({} each)", ranks_on_host, gib(have))
                                                         : std::string()));
}

void check_model_matches(const std::string& dir, const ModelConfig& config) {
  const auto diffs = model_config_differences(checkpoint_model_config(dir), config);
  if (!diffs.empty()) {
    fail_user("{} holds a different model than the config describes ({} difference{}):\n  - {}\nFix the config's model "
              "section or load another checkpoint.",
              dir, diffs.size(), diffs.size() > 1 ? "s" : "", fmt::join(diffs, "\n  - "));
  }
}

void check_precision_matches(const std::string& dir, bool bf16) {
  const SavedTrainState saved = read_train_state(dir);
  if (saved.bf16 != bf16) {
    fail_user("{} was trained with training.bf16 = {}, this config says {}: a resumed run keeps its precision. Set "
              "training.bf16: {}.",
              dir, saved.bf16, bf16, saved.bf16);
  }
  // The weights must be stored in that precision, as they were saved: a header edited to another
  // floating type would otherwise be converted silently on load.
  const char* expected = bf16 ? "BF16" : "F32";
  std::vector<fs::path> files_of_model;
  if (is_sharded_checkpoint(dir)) {
    for (const auto& entry : fs::directory_iterator(dir)) {
      if (fs::exists(entry.path() / files::kSafetensors)) files_of_model.push_back(entry.path() / files::kSafetensors);
    }
  } else {
    files_of_model.emplace_back(dir);
  }
  for (const auto& path : files_of_model) {
    const SafetensorsCheckpoint model(path.string());
    for (const auto& name : model.names()) {
      if (model.info(name).dtype != (is_rule_updated(name) ? "F32" : expected)) {
        fail_user("{}: tensor \"{}\" is stored as {}, but this checkpoint was trained and saved in {} "
                  "(trainer_state.json bf16: {}). The file was altered; restore it or resume from another checkpoint.",
                  model.file(name).path(), name, model.info(name).dtype, is_rule_updated(name) ? "F32" : expected, saved.bf16);
      }
    }
  }
}

void check_datasets_match(const std::string& dir, const std::vector<data::DatasetIdentity>& now, bool allow) {
  const auto recorded = read_train_state(dir).state.datasets;
  if (!recorded) {
    if (!now.empty()) {
      spdlog::warn("{} records no datasets (saved before moeforge recorded them): that data.data_path holds the data it "
                   "was trained on cannot be checked",
                   dir);
    }
    return;
  }
  const auto changes = data::dataset_changes(*recorded, now);
  if (changes.empty()) return;
  const std::string what = fmt::format("the datasets changed since the checkpoint {} was saved:\n  - {}\nresuming "
                                       "continues on another sample order than the run's",
                                       dir, fmt::join(changes, "\n  - "));
  if (allow) {
    spdlog::warn("{} (accepted: checkpoint.allow_dataset_change is true)", what);
    return;
  }
  fail_user("{}. Point data.data_path at the checkpoint's datasets, or --load at another checkpoint, or set "
            "checkpoint.allow_dataset_change: true to continue on these.",
            what);
}

void check_checkpoint_fits(const CheckpointToLoad& checkpoint, const ExperimentConfig& c, const ParallelLayout& layout) {
  if (is_sharded_checkpoint(checkpoint.dir)) check_shards_loadable(checkpoint.dir, layout);
  check_model_matches(checkpoint.dir, c.model);
  if (checkpoint.resume) check_precision_matches(checkpoint.dir, c.training.bf16);
}

void check_trainable(const ExperimentConfig& c) {
  const auto model = moe::build_model(c.model);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& item : model->named_parameters()) named.emplace_back(item.key(), item.value());
  select_trainable(named, c.training);
}

void check_gpu_build(const ExperimentConfig& c, int64_t world) {
#ifndef MOEFORGE_WITH_CUDA
  if (c.hardware.device == "cuda" && world > 1 && device_collectives(c) == DeviceCollectives::nccl) {
    fail_user("GPU training across ranks needs NCCL, and this build has no CUDA (see the GPU line of the CMake "
              "summary). Build on a machine with nvcc matching the torch wheel, train with hardware.device: cpu, or "
              "set parallel.device_collectives: host.");
  }
#else
  (void)c;
  (void)world;
#endif
}

DeviceCollectives device_collectives(const ExperimentConfig& c) {
  return c.parallel.device_collectives.value_or(c.hardware.device == "cuda" ? DeviceCollectives::nccl
                                                                             : DeviceCollectives::host);
}

}  // namespace moeforge
