#include "core/config/config_validate.h"

#include "core/base/errors.h"
#include "core/base/signals.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace moeforge {

namespace {

// Upper bounds on the model's sizes, far above any published model (widths up to ~25600, 256-384
// experts, vocabularies of ~256k) and low enough that the product of two (vocab x hidden, hidden
// x FFN width) fits 64 bits with room to spare: a typo or a corrupted config.json gets an error
// instead of an overflowed size. Products of more sizes (parameter and FLOP counts) are checked
// where they are formed (core/flops/model_size.cpp).
constexpr int64_t kMaxWidth = int64_t{1} << 24;  // hidden, FFN and attention widths, head counts
constexpr int64_t kMaxVocab = int64_t{1} << 31;
constexpr int64_t kMaxPositions = int64_t{1} << 31;
constexpr int64_t kMaxExperts = int64_t{1} << 20;

}  // namespace

void resolve_derived_values(ExperimentConfig& c, const std::string& config_path,
                            std::map<std::string, std::string>& origin) {
  auto derive = [&](auto& field, auto value, const char* name) {
    if (!field) {
      field = value;
      origin[name] = "derived";
    }
  };
  ModelConfig& m = c.model;
  derive(m.num_query_groups, m.num_attention_heads, "model.num_query_groups");
  // Derived only where exact: hidden / heads would otherwise truncate (validate_model says so).
  if (m.num_attention_heads > 0 && m.hidden_size % m.num_attention_heads == 0) {
    derive(m.kv_channels, m.hidden_size / m.num_attention_heads, "model.kv_channels");
  }
  // Not derived from a hidden size out of range (4x could overflow); model_config_problems says so.
  if (m.hidden_size > 0 && m.hidden_size <= kMaxWidth) derive(m.ffn_hidden_size, 4 * m.hidden_size, "model.ffn_hidden_size");
  if (m.num_experts && m.ffn_hidden_size) derive(m.moe_ffn_hidden_size, *m.ffn_hidden_size, "model.moe_ffn_hidden_size");
  // Without a sequence length (ConfigUse::model_only) there is nothing to derive it from: left
  // absent for the caller to fill (`moeforge upcycle` takes the dense checkpoint's).
  if (c.training.seq_length > 0) {
    derive(m.max_position_embeddings, c.training.seq_length, "model.max_position_embeddings");
  }
  derive(c.training.lr_decay_iters, c.training.train_iters, "training.lr_decay_iters");
  if (c.logging.run_dir.empty()) {
    c.logging.run_dir = (std::filesystem::path("runs") / std::filesystem::path(config_path).stem()).string();
    origin["logging.run_dir"] = "derived";
  }
}

namespace {

constexpr double kMaxTimeoutMinutes = 7 * 24 * 60;
// Beyond any real run: the largest clusters have about a hundred thousand devices.
constexpr int64_t kMaxRanks = int64_t{1} << 20;

class Problems {
 public:
  template <typename... Args>
  void add(fmt::format_string<Args...> format, Args&&... args) {
    list_.push_back(fmt::format(format, std::forward<Args>(args)...));
  }
  template <typename T>
  void positive(const std::string& name, T value) {
    if (!(value > 0)) return add("{} must be positive, got {}", name, value);
    fp32_representable(name, value);
  }
  // Deadlines are steady-clock nanoseconds in 64 bits (about 292 years): a larger timeout
  // overflowed into the past and every collective "timed out" at once. A week is far beyond any
  // wait that can still end well.
  void timeout_minutes(const char* name, double value) {
    positive(name, value);
    if (value > kMaxTimeoutMinutes) {
      add("{} is {}, above the largest supported, {} (a week): a wait that long will not end well; use at most {}", name,
          value, kMaxTimeoutMinutes, kMaxTimeoutMinutes);
    }
  }
  // A size far beyond any real run is a typo, and bounding it keeps every loop over it (layers,
  // stages, ranks) short and every product of such sizes countable.
  void at_most(const char* name, int64_t value, int64_t limit, const char* beyond) {
    if (value > limit) add("{} is {}, above {} ({}): check it for a typo", name, value, limit, beyond);
  }
  template <typename T>
  void non_negative(const std::string& name, T value) {
    if (!(value >= 0)) return add("{} must be >= 0, got {}", name, value);
    fp32_representable(name, value);
  }
  // A count or a width: positive, and at most `max` (the bounds above say why).
  void size(const std::string& name, int64_t value, int64_t max) {
    if (value < 1) return add("{} must be positive, got {}", name, value);
    if (value > max) {
      add("{} is {}, above the largest supported, {} (far beyond any real model): check it for a typo", name, value, max);
    }
  }
  // Floating settings reach the model and the optimizer in fp32: an infinite value, one beyond
  // fp32's range, or a nonzero one that rounds to 0 there (adam_eps: 1e-46) would train on
  // non-finite or meaningless numbers.
  template <typename T>
  void fp32_representable(const std::string& name, T value) {
    if constexpr (std::is_floating_point_v<T>) {
      const auto f = static_cast<float>(value);
      if (!std::isfinite(f)) {
        add("{} is {}, beyond fp32's range (the precision it is used in): use a finite value below {:g}", name, value,
            static_cast<double>(std::numeric_limits<float>::max()));
      } else if (value != 0 && f == 0.0f) {
        add("{} is {}, which is 0 in fp32 (the precision it is used in): use 0 or at least {:g}", name, value,
            static_cast<double>(std::numeric_limits<float>::min()));
      }
    }
  }
  const std::vector<std::string>& list() const { return list_; }
  void throw_if_any() const {
    if (list_.empty()) return;
    fail_user("invalid config ({} problem{}):\n  - {}", list_.size(), list_.size() > 1 ? "s" : "",
              fmt::join(list_, "\n  - "));
  }

 private:
  std::vector<std::string> list_;
};

void validate_model(const ModelConfig& m, const ModelKeyName& k, Problems& p) {
  p.size(k("num_layers"), m.num_layers, kMaxModelLayers);
  p.size(k("hidden_size"), m.hidden_size, kMaxWidth);
  p.size(k("num_attention_heads"), m.num_attention_heads, kMaxWidth);
  p.size(k("vocab_size"), m.vocab_size, kMaxVocab);
  p.size(k("make_vocab_size_divisible_by"), m.make_vocab_size_divisible_by, kMaxVocab);
  p.positive(k("rotary_base"), m.rotary_base);
  p.positive(k("norm_epsilon"), m.norm_epsilon);
  p.positive(k("init_method_std"), m.init_method_std);
  p.positive(k("num_query_groups"), *m.num_query_groups);
  if (m.kv_channels) {
    p.size(k("kv_channels"), *m.kv_channels, kMaxWidth);
    // Both in range, the product fits: the query projection's width.
    if (*m.kv_channels >= 1 && *m.kv_channels <= kMaxWidth && m.num_attention_heads >= 1 &&
        m.num_attention_heads <= kMaxWidth && m.query_projection_size() > kMaxWidth) {
      p.add("{} x {} ({} x {} = {}, the attention's width) is above the largest supported, {}: check both for a typo",
            k("num_attention_heads"), k("kv_channels"), m.num_attention_heads, *m.kv_channels, m.query_projection_size(),
            kMaxWidth);
    }
  }
  if (m.ffn_hidden_size) p.size(k("ffn_hidden_size"), *m.ffn_hidden_size, kMaxWidth);
  if (m.max_position_embeddings) p.size(k("max_position_embeddings"), *m.max_position_embeddings, kMaxPositions);
  if (m.num_attention_heads > 0 && !m.kv_channels) {
    // Not derived (resolve_derived_values): hidden / heads is not whole. An explicit head size needs
    // no such relation (the projections are heads x kv_channels wide).
    p.add("{} ({}) is not divisible by {} ({}): choose a head count that divides it, or set {} explicitly",
          k("hidden_size"), m.hidden_size, k("num_attention_heads"), m.num_attention_heads, k("kv_channels"));
  }
  if (*m.num_query_groups > 0 && m.num_attention_heads % *m.num_query_groups != 0) {
    p.add("{} ({}) is not divisible by {} ({}): every key/value head must serve the same number of query heads",
          k("num_attention_heads"), m.num_attention_heads, k("num_query_groups"), *m.num_query_groups);
  }

  if (!m.num_experts) {
    if (m.moe_router_enable_expert_bias) {
      p.add("{} is true but {} is null: a dense model has no router; set {} or turn the bias off",
            k("moe_router_enable_expert_bias"), k("num_experts"), k("num_experts"));
    }
    if (m.moe_shared_expert_intermediate_size) {
      p.add("{} is set but {} is null: a shared expert only exists in MoE layers; set {} or remove the shared expert",
            k("moe_shared_expert_intermediate_size"), k("num_experts"), k("num_experts"));
    }
    return;
  }
  const int64_t E = *m.num_experts;
  p.size(k("num_experts"), E, kMaxExperts);
  if (m.moe_ffn_hidden_size) p.size(k("moe_ffn_hidden_size"), *m.moe_ffn_hidden_size, kMaxWidth);
  if (m.moe_router_topk < 1 || m.moe_router_topk > E) {
    p.add("{} ({}) must be between 1 and {} ({})", k("moe_router_topk"), m.moe_router_topk, k("num_experts"), E);
  }
  p.non_negative(k("moe_aux_loss_coeff"), m.moe_aux_loss_coeff);
  p.non_negative(k("moe_z_loss_coeff"), m.moe_z_loss_coeff);
  if (m.moe_router_load_balancing_type == LoadBalancingType::none && m.moe_aux_loss_coeff > 0) {
    p.add("{} is {} but {} is none: pick a loss type or set the coefficient to 0", k("moe_aux_loss_coeff"),
          m.moe_aux_loss_coeff, k("moe_router_load_balancing_type"));
  }
  if (m.moe_router_enable_expert_bias) {
    p.positive(k("moe_router_bias_update_rate"), m.moe_router_bias_update_rate);
    if (m.moe_router_force_load_balancing) {
      p.add("{} and {} are both true: the forced assignment ignores the scores, so the bias would only drift; turn one "
            "off",
            k("moe_router_enable_expert_bias"), k("moe_router_force_load_balancing"));
    }
  }
  if (m.moe_expert_capacity_factor) {
    const double factor = *m.moe_expert_capacity_factor;
    p.positive(k("moe_expert_capacity_factor"), factor);
    // At num_experts every expert has room for all T x k slots (the capacity, T x k / E x factor,
    // is converted to an integer: a larger factor could overflow it).
    if (factor > static_cast<double>(E)) {
      p.add("{} is {}, above {} ({}), where no token is dropped any more: use null (dropless) instead",
            k("moe_expert_capacity_factor"), factor, k("num_experts"), E);
    }
  }
  if (m.moe_shared_expert_intermediate_size) {
    p.size(k("moe_shared_expert_intermediate_size"), *m.moe_shared_expert_intermediate_size, kMaxWidth);
  } else if (m.moe_shared_expert_gate) {
    p.add("{} is true but there is no shared expert: set {} or turn the gate off", k("moe_shared_expert_gate"),
          k("moe_shared_expert_intermediate_size"));
  }
  const MoeLayerFreq& f = m.moe_layer_freq;
  if (f.pattern.empty()) {
    p.positive(k("moe_layer_freq"), f.every);
  } else {
    if (static_cast<int64_t>(f.pattern.size()) != m.num_layers) {
      p.add("{} lists {} layers but {} is {}: give one 0/1 entry per layer", k("moe_layer_freq"), f.pattern.size(),
            k("num_layers"), m.num_layers);
    }
    for (size_t i = 0; i < f.pattern.size(); ++i) {
      if (f.pattern[i] != 0 && f.pattern[i] != 1) {
        p.add("{}[{}] is {}: entries are 1 (MoE layer) or 0 (dense FFN)", k("moe_layer_freq"), i, f.pattern[i]);
      }
    }
  }
}

void validate_training(const TrainingConfig& t, Problems& p) {
  p.positive("training.seq_length", t.seq_length);
  p.positive("training.micro_batch_size", t.micro_batch_size);
  p.positive("training.global_batch_size", t.global_batch_size);
  p.positive("training.train_iters", t.train_iters);
  p.non_negative("training.lr", t.lr);
  p.non_negative("training.min_lr", t.min_lr);
  if (t.min_lr > t.lr) p.add("training.min_lr ({}) is above training.lr ({})", t.min_lr, t.lr);
  p.non_negative("training.lr_warmup_iters", t.lr_warmup_iters);
  p.positive("training.lr_decay_iters", *t.lr_decay_iters);
  if (t.lr_warmup_iters > *t.lr_decay_iters) {
    p.add("training.lr_warmup_iters ({}) exceeds training.lr_decay_iters ({}): warm-up must end before decay does",
          t.lr_warmup_iters, *t.lr_decay_iters);
  }
  p.non_negative("training.weight_decay", t.weight_decay);
  if (!(t.adam_beta1 >= 0 && t.adam_beta1 < 1)) p.add("training.adam_beta1 must be in [0, 1), got {}", t.adam_beta1);
  if (!(t.adam_beta2 >= 0 && t.adam_beta2 < 1)) p.add("training.adam_beta2 must be in [0, 1), got {}", t.adam_beta2);
  p.positive("training.adam_eps", t.adam_eps);
  p.non_negative("training.clip_grad", t.clip_grad);
  p.non_negative("training.seed", t.seed);
  p.positive("training.eval_interval", t.eval_interval);
  p.non_negative("training.eval_iters", t.eval_iters);
  if (!exit_signal_number(t.exit_signal)) {
    std::vector<std::string_view> names;
    for (const auto& [name, number] : kExitSignals) names.push_back(name);
    p.add("training.exit_signal is '{}': use one of {} (under mpirun SIGUSR1, which it forwards to every rank)",
          t.exit_signal, fmt::join(names, ", "));
  }
  if (t.exit_duration_in_mins) p.positive("training.exit_duration_in_mins", *t.exit_duration_in_mins);
  if (t.exit_interval) p.positive("training.exit_interval", *t.exit_interval);
  // The schedule's lengths and the run's samples, in samples: kept below kMaxSamples (config.h).
  const int64_t iters = std::max(t.train_iters, *t.lr_decay_iters);
  if (t.global_batch_size > 0 && iters > kMaxSamples / t.global_batch_size) {
    p.add("training.global_batch_size ({}) x {} ({}) is above 2^53 samples, more than any run trains on: check both for "
          "a typo",
          t.global_batch_size, iters == t.train_iters ? "training.train_iters" : "training.lr_decay_iters", iters);
  }
}

// A device type is a LibTorch name (lower case, as c10::Device parses it); whether LibTorch knows it
// is found out at start-up, after a device_library has registered it.
void validate_device(const HardwareConfig& h, Problems& p) {
  const bool name_ok = !h.device.empty() && std::all_of(h.device.begin(), h.device.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_';
  });
  if (!name_ok) {
    p.add("hardware.device is '{}': use a LibTorch device type such as cpu, cuda or emulated (lower case, no index: "
          "each rank takes the device of its local rank)",
          h.device);
  }
  if (h.device == "cpu" && !h.device_library.empty()) {
    p.add("hardware.device_library '{}' is set but hardware.device is cpu: set hardware.device to the type the library "
          "registers, or remove the library",
          h.device_library);
  }
  p.positive("hardware.emulated_memory_gib", h.emulated_memory_gib);
  if (h.emulated_devices_per_node) p.positive("hardware.emulated_devices_per_node", *h.emulated_devices_per_node);
  if (h.emulated_stream_check && h.device != "emulated") {
    p.add("hardware.emulated_stream_check is true but hardware.device is {}: the checker is the emulated device's; set "
          "hardware.device: emulated or remove it",
          h.device);
  }
}

void validate_device_collectives(const ExperimentConfig& c, Problems& p) {
  if (c.parallel.device_collectives == DeviceCollectives::nccl && c.hardware.device != "cuda") {
    p.add("parallel.device_collectives is nccl but hardware.device is {}: NCCL moves CUDA memory only; use host "
          "(through pinned host memory and MPI) or leave it null",
          c.hardware.device);
  }
}

}  // namespace

std::vector<std::string> model_config_problems(const ModelConfig& model, const ModelKeyName& key) {
  Problems p;
  validate_model(model, key, p);
  return p.list();
}

void validate_config(const ExperimentConfig& c, ConfigUse use) {
  Problems p;
  validate_model(c.model, [](std::string_view field) { return fmt::format("model.{}", field); }, p);
  const ModelConfig& m = c.model;
  if (m.max_position_embeddings && *m.max_position_embeddings < c.training.seq_length) {
    p.add("model.max_position_embeddings ({}) is shorter than training.seq_length ({}): raise it or shorten sequences",
          *m.max_position_embeddings, c.training.seq_length);
  }
  // A redundant setting rather than an invalid model (the k weights sum to 1 either way): refused
  // where it is written, in the YAML, but a checkpoint that states it (moeforge's router keys in
  // config.json) describes the model exactly and reads.
  if (m.is_moe() && m.moe_router_norm_topk_prob && !m.moe_router_pre_softmax) {
    p.add("model.moe_router_norm_topk_prob is true but model.moe_router_pre_softmax is false: top-k on logits then "
          "softmax already sums to 1; set moe_router_pre_softmax: true for Mixtral-style renormalized routing");
  }
  if (use == ConfigUse::model_only) return p.throw_if_any();
  validate_training(c.training, p);
  const ParallelConfig& par = c.parallel;
  if (par.world_size) p.positive("parallel.world_size", *par.world_size);
  p.positive("parallel.pipeline_model_parallel_size", par.pipeline_model_parallel_size);
  p.positive("parallel.tensor_model_parallel_size", par.tensor_model_parallel_size);
  p.positive("parallel.virtual_pipeline_model_parallel_size", par.virtual_pipeline_model_parallel_size);
  p.positive("parallel.expert_model_parallel_size", par.expert_model_parallel_size);
  for (const auto& [name, degree] : {std::pair{"parallel.world_size", par.world_size.value_or(1)},
                                     {"parallel.pipeline_model_parallel_size", par.pipeline_model_parallel_size},
                                     {"parallel.tensor_model_parallel_size", par.tensor_model_parallel_size},
                                     {"parallel.virtual_pipeline_model_parallel_size", par.virtual_pipeline_model_parallel_size},
                                     {"parallel.expert_model_parallel_size", par.expert_model_parallel_size}}) {
    p.at_most(name, degree, kMaxRanks, "more ranks than any cluster has");
  }
  p.timeout_minutes("parallel.distributed_timeout_minutes", par.distributed_timeout_minutes);
  p.timeout_minutes("checkpoint.save_timeout_minutes", c.checkpoint.save_timeout_minutes);
  p.non_negative("parallel.ddp_bucket_size", par.ddp_bucket_size);
  if ((c.data.reset_position_ids || c.data.eod_mask_loss) && c.data.tokenizer_model.empty()) {
    p.add("data.reset_position_ids / data.eod_mask_loss need the EOD token id: set data.tokenizer_model");
  }
  if (c.checkpoint.save_interval) p.positive("checkpoint.save_interval", *c.checkpoint.save_interval);
  p.non_negative("checkpoint.keep_latest_k", c.checkpoint.keep_latest_k);
  p.positive("logging.log_interval", c.logging.log_interval);
  p.non_negative("logging.expert_loads_interval", c.logging.expert_loads_interval);
  if (c.logging.profile) {
    p.positive("logging.profile_step_start", c.logging.profile_step_start);
    if (c.logging.profile_step_end <= c.logging.profile_step_start) {
      p.add("logging.profile_step_end ({}) must be above logging.profile_step_start ({}): it is the first iteration not "
            "profiled",
            c.logging.profile_step_end, c.logging.profile_step_start);
    }
  }
  if (c.hardware.peak_tflops) p.positive("hardware.peak_tflops", *c.hardware.peak_tflops);
  if (c.hardware.reference_compute_n) p.positive("hardware.reference_compute_n", *c.hardware.reference_compute_n);
  p.non_negative("hardware.num_threads", c.hardware.num_threads);
  validate_device(c.hardware, p);
  validate_device_collectives(c, p);
  p.throw_if_any();
}

}  // namespace moeforge
