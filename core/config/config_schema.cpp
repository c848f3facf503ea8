#include "core/config/config_schema.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

namespace moeforge {

namespace {

std::string describe(const YAML::Node& node) {
  if (node.IsNull()) return "null";
  if (node.IsScalar()) return fmt::format("'{}'", node.Scalar());
  if (node.IsSequence()) return "a list";
  return "a mapping";
}

[[noreturn]] void expected(const std::string& what, const YAML::Node& node) {
  throw std::invalid_argument(fmt::format("expected {}, got {}", what, describe(node)));
}

// Codec<T>: YAML <-> T for every field type the schema uses.
template <typename T>
struct Codec;

template <>
struct Codec<int64_t> {
  static std::string type() { return "integer"; }
  static int64_t decode(const YAML::Node& n) {
    int64_t v = 0;
    if (!n.IsScalar() || !YAML::convert<int64_t>::decode(n, v)) expected("an integer", n);
    return v;
  }
  static YAML::Node encode(int64_t v) { return YAML::Node(v); }
};

template <>
struct Codec<double> {
  static std::string type() { return "number"; }
  static double decode(const YAML::Node& n) {
    double v = 0;
    if (!n.IsScalar() || !YAML::convert<double>::decode(n, v)) expected("a number", n);
    return v;
  }
  // The shortest text that reads back as the same double (`0.1`, not yaml-cpp's 17 digits
  // `0.10000000000000001`), for the table and the written YAML alike. Infinities and NaN keep
  // yaml-cpp's spelling (`.inf`, `.nan`), which its decoder reads.
  static YAML::Node encode(double v) { return std::isfinite(v) ? YAML::Node(fmt::format("{}", v)) : YAML::Node(v); }
};

template <>
struct Codec<bool> {
  static std::string type() { return "boolean"; }
  static bool decode(const YAML::Node& n) {
    bool v = false;
    if (!n.IsScalar() || !YAML::convert<bool>::decode(n, v)) expected("true or false", n);
    return v;
  }
  static YAML::Node encode(bool v) { return YAML::Node(v); }
};

template <>
struct Codec<std::string> {
  static std::string type() { return "string"; }
  static std::string decode(const YAML::Node& n) {
    if (!n.IsScalar()) expected("a string", n);
    return n.Scalar();
  }
  static YAML::Node encode(const std::string& v) { return YAML::Node(v); }
};

template <>
struct Codec<std::vector<std::string>> {
  static std::string type() { return "list of strings"; }
  static std::vector<std::string> decode(const YAML::Node& n) {
    if (n.IsScalar()) return {n.Scalar()};  // a single entry may be written without brackets
    if (!n.IsSequence()) expected("a list of strings", n);
    std::vector<std::string> out;
    for (const auto& item : n) out.push_back(Codec<std::string>::decode(item));
    return out;
  }
  static YAML::Node encode(const std::vector<std::string>& v) {
    YAML::Node node(YAML::NodeType::Sequence);
    for (const auto& s : v) node.push_back(s);
    return node;
  }
};

template <>
struct Codec<MoeLayerFreq> {
  static std::string type() { return "integer k, or list of 0/1 per layer"; }
  static MoeLayerFreq decode(const YAML::Node& n) {
    MoeLayerFreq f;
    if (n.IsScalar()) {
      f.every = Codec<int64_t>::decode(n);
      return f;
    }
    if (!n.IsSequence()) expected("an integer or a list of 0/1", n);
    for (const auto& item : n) f.pattern.push_back(Codec<int64_t>::decode(item));
    return f;
  }
  static YAML::Node encode(const MoeLayerFreq& f) {
    if (f.pattern.empty()) return YAML::Node(f.every);
    YAML::Node node(YAML::NodeType::Sequence);
    for (auto v : f.pattern) node.push_back(v);
    return node;
  }
};

template <typename E>
  requires std::is_enum_v<E>
struct Codec<E> {
  static std::string type() {
    std::string s = "one of {";
    for (const auto& [v, name] : enum_names<E>()) s += fmt::format("{}{}", s.back() == '{' ? "" : ", ", name);
    return s + "}";
  }
  static E decode(const YAML::Node& n) {
    if (n.IsScalar()) {
      for (const auto& [v, name] : enum_names<E>()) {
        if (n.Scalar() == name) return v;
      }
    }
    expected(type(), n);
  }
  static YAML::Node encode(E v) { return YAML::Node(std::string(to_string(v))); }
};

template <typename T>
struct Codec<std::optional<T>> {
  static std::string type() { return Codec<T>::type() + " or null"; }
  static std::optional<T> decode(const YAML::Node& n) {
    if (n.IsNull()) return std::nullopt;
    return Codec<T>::decode(n);
  }
  static YAML::Node encode(const std::optional<T>& v) {
    return v ? Codec<T>::encode(*v) : YAML::Node(YAML::NodeType::Null);
  }
};

template <typename Section, typename T>
ConfigField bind(const char* section, Section ExperimentConfig::*sec, const char* key, T Section::*member,
                 const char* doc, bool required = false) {
  ConfigField f;
  f.section = section;
  f.key = key;
  f.type = Codec<T>::type();
  f.doc = doc;
  f.required = required;
  f.assign = [sec, member](ExperimentConfig& c, const YAML::Node& n) { (c.*sec).*member = Codec<T>::decode(n); };
  f.to_yaml = [sec, member](const ExperimentConfig& c) { return Codec<T>::encode((c.*sec).*member); };
  return f;
}

constexpr bool kRequired = true;

std::vector<ConfigField> make_fields() {
  using C = ExperimentConfig;
  const auto M = &C::model;
  const auto P = &C::parallel;
  const auto T = &C::training;
  const auto D = &C::data;
  const auto K = &C::checkpoint;
  const auto L = &C::logging;
  const auto H = &C::hardware;
  using MC = ModelConfig;
  using PC = ParallelConfig;
  using TC = TrainingConfig;
  using DC = DataConfig;
  using KC = CheckpointConfig;
  using LC = LoggingConfig;
  using HC = HardwareConfig;
  return {
      // model
      bind("model", M, "model_type", &MC::model_type, "Hugging Face family used for checkpoints (tensor names, config.json)"),
      bind("model", M, "num_layers", &MC::num_layers, "Transformer layers", kRequired),
      bind("model", M, "hidden_size", &MC::hidden_size, "Model width h", kRequired),
      bind("model", M, "num_attention_heads", &MC::num_attention_heads, "Query heads", kRequired),
      bind("model", M, "num_query_groups", &MC::num_query_groups, "Key/value heads for GQA; null = num_attention_heads (MHA)"),
      bind("model", M, "kv_channels", &MC::kv_channels, "Head dimension; null = hidden_size / num_attention_heads"),
      bind("model", M, "ffn_hidden_size", &MC::ffn_hidden_size, "SwiGLU width of dense FFN layers; null = 4 * hidden_size"),
      bind("model", M, "vocab_size", &MC::vocab_size, "Vocabulary size before padding (the tokenizer's size)", kRequired),
      bind("model", M, "make_vocab_size_divisible_by", &MC::make_vocab_size_divisible_by, "Pad the vocabulary to a multiple of this"),
      bind("model", M, "max_position_embeddings", &MC::max_position_embeddings, "Longest sequence RoPE is built for; null = training.seq_length"),
      bind("model", M, "rotary_base", &MC::rotary_base, "RoPE theta"),
      bind("model", M, "norm_epsilon", &MC::norm_epsilon, "RMSNorm epsilon"),
      bind("model", M, "add_qkv_bias", &MC::add_qkv_bias, "Bias on the q, k, v projections (Qwen: true)"),
      bind("model", M, "untie_embeddings_and_output_weights", &MC::untie_embeddings_and_output_weights, "Separate LM head instead of reusing the embedding"),
      bind("model", M, "init_method_std", &MC::init_method_std, "Std of the normal weight init; output projections use std / sqrt(2 * num_layers)"),
      bind("model", M, "num_experts", &MC::num_experts, "Routed experts per MoE layer; null = dense model"),
      bind("model", M, "moe_ffn_hidden_size", &MC::moe_ffn_hidden_size, "SwiGLU width of one routed expert; null = ffn_hidden_size"),
      bind("model", M, "moe_router_topk", &MC::moe_router_topk, "Experts chosen per token"),
      bind("model", M, "moe_router_pre_softmax", &MC::moe_router_pre_softmax, "Softmax over all experts, then top-k (Qwen, Mixtral); false = top-k on logits, then softmax over the k (Megatron's default)"),
      bind("model", M, "moe_router_norm_topk_prob", &MC::moe_router_norm_topk_prob, "With pre-softmax: renormalize the k weights to sum to 1 (Mixtral); Qwen1.5-MoE: false"),
      bind("model", M, "moe_router_force_load_balancing", &MC::moe_router_force_load_balancing, "Benchmarks only: the router runs but slot k of token t goes to expert (t*K + k) mod E, so every expert gets T*K/E slots (+-1) and each token K distinct experts; the run is marked, its loss is not a training result"),
      bind("model", M, "moe_router_enable_expert_bias", &MC::moe_router_enable_expert_bias, "Aux-loss-free balancing (DeepSeek-V3): a per-expert bias on the scores the top-k selects by (not on the combine weights), updated after every optimizer step from the global batch's loads"),
      bind("model", M, "moe_router_bias_update_rate", &MC::moe_router_bias_update_rate, "With the expert bias: bias += rate * sign(mean load - load) per optimizer step"),
      bind("model", M, "moe_router_load_balancing_type", &MC::moe_router_load_balancing_type, "Load-balancing loss: Megatron's per-layer aux_loss, seq_aux_loss or global_aux_loss (the global batch's expert loads), Hugging Face's loss pooled over layers (hf_pooled_aux_loss), or none"),
      bind("model", M, "moe_aux_loss_coeff", &MC::moe_aux_loss_coeff, "Weight of the load-balancing loss"),
      bind("model", M, "moe_z_loss_coeff", &MC::moe_z_loss_coeff, "Weight of the router z-loss; 0 = off"),
      bind("model", M, "moe_expert_capacity_factor", &MC::moe_expert_capacity_factor, "Tokens per expert capped at factor * T * k / E; null = dropless"),
      bind("model", M, "moe_token_drop_policy", &MC::moe_token_drop_policy, "With a capacity factor: drop the lowest-probability slots or the latest ones"),
      bind("model", M, "moe_shared_expert_intermediate_size", &MC::moe_shared_expert_intermediate_size, "Total width of the shared expert; null = none"),
      bind("model", M, "moe_shared_expert_gate", &MC::moe_shared_expert_gate, "Scale the shared expert by sigmoid(Linear(h -> 1)) (Qwen1.5-MoE)"),
      bind("model", M, "moe_layer_freq", &MC::moe_layer_freq, "Which layers are MoE: k = every k-th layer from layer 0, or a 0/1 list per layer (0 = dense FFN)"),
      bind("model", M, "kernels", &MC::kernels,
           "fused: our kernels where they exist for the device (core/kernels); reference: the LibTorch compositions they replace"),
      // parallel
      bind("parallel", P, "world_size", &PC::world_size, "Ranks (devices) the experiment is meant for; null = as launched"),
      bind("parallel", P, "pipeline_model_parallel_size", &PC::pipeline_model_parallel_size, "Pipeline stages (PP)"),
      bind("parallel", P, "tensor_model_parallel_size", &PC::tensor_model_parallel_size, "Tensor-parallel ranks: attention heads, FFN and expert widths split over them (Megatron's --tensor-model-parallel-size)"),
      bind("parallel", P, "sequence_parallel", &PC::sequence_parallel, "With TP > 1, each TP rank keeps 1/TP of the sequence outside the split blocks (norms, embedding output, head, loss, pipeline messages): all-gather before a block and reduce-scatter after it instead of the all-reduces (Megatron's --sequence-parallel); ignored with TP 1"),
      bind("parallel", P, "virtual_pipeline_model_parallel_size", &PC::virtual_pipeline_model_parallel_size, "Model chunks per pipeline rank (interleaved 1F1B, Megatron's virtual pipeline stages); 1 = plain 1F1B"),
      bind("parallel", P, "expert_model_parallel_size", &PC::expert_model_parallel_size, "Expert-parallel ranks (EP); divides the data-parallel size"),
      bind("parallel", P, "decoder_first_pipeline_num_layers", &PC::decoder_first_pipeline_num_layers, "Layers on the first stage of an uneven pipeline; null = even"),
      bind("parallel", P, "decoder_last_pipeline_num_layers", &PC::decoder_last_pipeline_num_layers, "Layers on the last stage of an uneven pipeline; null = even"),
      bind("parallel", P, "use_distributed_optimizer", &PC::use_distributed_optimizer, "Shard fp32 master weights and Adam state over data-parallel ranks (ZeRO-1)"),
      bind("parallel", P, "distributed_timeout_minutes", &PC::distributed_timeout_minutes, "A collective blocked longer than this ends the run on every rank"),
      bind("parallel", P, "overlap_comm", &PC::overlap_comm, "Overlap communication with compute on communication threads: data-parallel gradient buckets reduced during the backward, expert all-to-alls in flight while the shared expert computes; false: blocking, after the backward and inline"),
      bind("parallel", P, "ddp_bucket_size", &PC::ddp_bucket_size, "Elements (not bytes) per data-parallel gradient bucket, as Megatron's --ddp-bucket-size; 0 = max(40M, 1M x DP)"),
      bind("parallel", P, "device_collectives", &PC::device_collectives, "How collectives move device tensors: nccl (CUDA only) or host (pinned host memory and MPI, any accelerator); null = nccl on cuda, host elsewhere"),
      // training
      bind("training", T, "seq_length", &TC::seq_length, "Tokens per sample", kRequired),
      bind("training", T, "micro_batch_size", &TC::micro_batch_size, "Samples per micro-batch per data-parallel rank"),
      bind("training", T, "global_batch_size", &TC::global_batch_size, "Samples per optimizer step over all ranks", kRequired),
      bind("training", T, "train_iters", &TC::train_iters, "Optimizer steps", kRequired),
      bind("training", T, "lr", &TC::lr, "Peak learning rate", kRequired),
      bind("training", T, "min_lr", &TC::min_lr, "Learning rate at the end of decay"),
      bind("training", T, "lr_decay_style", &TC::lr_decay_style, "Decay after warm-up"),
      bind("training", T, "lr_decay_iters", &TC::lr_decay_iters, "Iterations over which the LR decays; null = train_iters"),
      bind("training", T, "lr_warmup_iters", &TC::lr_warmup_iters, "Linear warm-up iterations"),
      bind("training", T, "weight_decay", &TC::weight_decay, "AdamW decoupled weight decay (not applied to norms and biases)"),
      bind("training", T, "adam_beta1", &TC::adam_beta1, "Adam beta1"),
      bind("training", T, "adam_beta2", &TC::adam_beta2, "Adam beta2"),
      bind("training", T, "adam_eps", &TC::adam_eps, "Adam epsilon"),
      bind("training", T, "clip_grad", &TC::clip_grad, "Clip the global gradient norm to this; 0 = off"),
      bind("training", T, "bf16", &TC::bf16, "Run the model in bf16 with fp32 master weights and optimizer state"),
      bind("training", T, "deterministic", &TC::deterministic, "LibTorch's deterministic algorithms and cuBLAS's fixed workspace: a GPU run repeats bit for bit (slower; an op without a deterministic implementation warns, naming itself). CPU runs repeat either way"),
      bind("training", T, "recompute_granularity", &TC::recompute_granularity, "Activation recomputation: none, full (every layer), selective (attention core)"),
      bind("training", T, "seed", &TC::seed, "Seed for initialization and data shuffling"),
      bind("training", T, "eval_interval", &TC::eval_interval, "Evaluate on the valid split every this many iterations"),
      bind("training", T, "eval_iters", &TC::eval_iters, "Iterations per evaluation"),
      bind("training", T, "on_nonfinite", &TC::on_nonfinite, "A non-finite loss or gradient norm: stop the run, or skip the update and count it"),
      bind("training", T, "trainable", &TC::trainable, "Parameter-name globs that train (e.g. \"layers.*.mlp.gate.weight\"); empty = all"),
      bind("training", T, "frozen", &TC::frozen, "Parameter-name globs that do not train (applied after trainable)"),
      bind("training", T, "exit_signal_handler", &TC::exit_signal_handler, "On training.exit_signal: every rank stops after the same iteration, saves a checkpoint and exits 0 (Megatron's --exit-signal-handler)"),
      bind("training", T, "exit_signal", &TC::exit_signal, "The signal exit_signal_handler handles: SIGTERM, SIGINT, SIGHUP, SIGUSR1 or SIGUSR2 (under mpirun SIGUSR1: mpirun kills ranks 1 s after forwarding SIGTERM)"),
      bind("training", T, "exit_duration_in_mins", &TC::exit_duration_in_mins, "Stop, save and exit 0 after the iteration at which the process has run this many minutes (start-up included); null = no limit"),
      bind("training", T, "exit_interval", &TC::exit_interval, "Stop, save and exit 0 after an iteration that is a multiple of this; null = never"),
      // data
      bind("data", D, "data_path", &DC::data_path, "Megatron dataset prefix(es) (without .bin/.idx); a blend is [w1, prefix1, w2, prefix2, ...]"),
      bind("data", D, "split", &DC::split, "Train/valid/test proportions, Megatron's format, e.g. \"99,1,0\""),
      bind("data", D, "tokenizer_model", &DC::tokenizer_model, "Hugging Face tokenizer.json, or \"byte\" for the byte-level tokenizer; gives the EOD id"),
      bind("data", D, "data_cache_path", &DC::data_cache_path, "Where dataset indices are cached; empty = <dataset dir>/cache/GPTDataset_indices"),
      bind("data", D, "reset_position_ids", &DC::reset_position_ids, "Restart position ids after each EOD token (needs tokenizer_model)"),
      bind("data", D, "eod_mask_loss", &DC::eod_mask_loss, "No loss on EOD tokens (needs tokenizer_model)"),
      // checkpoint
      bind("checkpoint", K, "save", &KC::save, "Directory to save checkpoints into; empty = none"),
      bind("checkpoint", K, "load", &KC::load, "Checkpoint directory to start from; empty = fresh start"),
      bind("checkpoint", K, "save_interval", &KC::save_interval, "Save every this many iterations; null = only at the end"),
      bind("checkpoint", K, "keep_latest_k", &KC::keep_latest_k, "Keep only the newest k checkpoints in save; 0 = keep all"),
      bind("checkpoint", K, "save_timeout_minutes", &KC::save_timeout_minutes,
           "How long the ranks that do not write wait for a save's writers (progress logged) before ending the run; "
           "a save is not bounded by parallel.distributed_timeout_minutes"),
      bind("checkpoint", K, "overwrite", &KC::overwrite, "Allow a run to start fresh in a save directory that holds iter_* checkpoints but no latest_checkpointed_iteration.txt, saving over them; false = refused"),
      bind("checkpoint", K, "allow_dataset_change", &KC::allow_dataset_change, "Resume although a dataset of data.data_path changed since the checkpoint was saved (its .idx's size or contents, its .bin's size), continuing on the new sample order with a warning; false = refused"),
      bind("checkpoint", K, "format", &KC::format, "whole: one Hugging Face checkpoint written by rank 0 (resumes on any layout); sharded: one directory per pipeline stage and EP rank (moeforge convert changes layout)"),
      // logging
      bind("logging", L, "log_interval", &LC::log_interval, "Print a step line every this many iterations"),
      bind("logging", L, "log_level", &LC::log_level, "Log verbosity (--log-level overrides)"),
      bind("logging", L, "run_dir", &LC::run_dir, "Where the resolved config and metrics go; empty = runs/<config name>"),
      bind("logging", L, "tensorboard_dir", &LC::tensorboard_dir, "Write TensorBoard event files of every logged step's scalars here (rank 0); empty = none"),
      bind("logging", L, "profile", &LC::profile,
           "Profile rank 0's iterations [profile_step_start, profile_step_end) with LibTorch's profiler: "
           "<run_dir>/profile/trace.json (Chrome trace) and top_ops.txt"),
      bind("logging", L, "profile_step_start", &LC::profile_step_start, "First profiled iteration (1-based)"),
      bind("logging", L, "profile_step_end", &LC::profile_step_end, "Profiling stops before this iteration"),
      bind("logging", L, "expert_loads_interval", &LC::expert_loads_interval,
           "Every this many iterations (and the last), each MoE layer's tokens per expert over the global batch into "
           "<run_dir>/expert_loads.jsonl (docs/report.md); 0 = never"),
      // hardware
      bind("hardware", H, "device", &HC::device, "Where the model runs: cpu, cuda, emulated (an accelerator emulated on the host, docs/gpu.md) or a device type a backend library registers"),
      bind("hardware", H, "device_library", &HC::device_library, "A LibTorch backend library loaded at start-up (a vendor's PrivateUse1 backend); empty = none (emulated: the emulator built beside moeforge)"),
      bind("hardware", H, "emulated_memory_gib", &HC::emulated_memory_gib, "Memory of each emulated device, GiB (its out-of-memory error and memory metrics as a GPU's)"),
      bind("hardware", H, "emulated_devices_per_node", &HC::emulated_devices_per_node, "Emulated devices per node; null = one per local rank"),
      bind("hardware", H, "emulated_stream_check", &HC::emulated_stream_check, "The emulated device's stream-order checker: reports every race between streams (a missing event wait or recordStream); a run with any ends with an error"),
      bind("hardware", H, "chip", &HC::chip, "Accelerator name for MFU peaks and reports (e.g. H100); empty = detect"),
      bind("hardware", H, "peak_tflops", &HC::peak_tflops, "Peak dense TFLOP/s per device for MFU; null = known-chip table or CPU calibration"),
      bind("hardware", H, "num_threads", &HC::num_threads, "Compute threads per rank; 0 = LibTorch's default"),
      bind("hardware", H, "reference_compute_n", &HC::reference_compute_n, "A benchmark case's own N for 6N MFU (FlagPerf's qwen1.5-MoE case: 2.3e9), reported beside ours by `moeforge report`; null = none"),
  };
}

}  // namespace

const std::vector<ConfigField>& config_fields() {
  static const std::vector<ConfigField> fields = make_fields();
  return fields;
}

const std::vector<std::string>& config_sections() {
  static const std::vector<std::string> sections = {"model",      "parallel", "training", "data",
                                                    "checkpoint", "logging",  "hardware"};
  return sections;
}

const ConfigField* find_config_field(const std::string& section, const std::string& key) {
  for (const auto& f : config_fields()) {
    if (f.section == section && f.key == key) return &f;
  }
  return nullptr;
}

std::string format_field_value(const ConfigField& field, const ExperimentConfig& config) {
  YAML::Emitter out;
  out << YAML::Flow << field.to_yaml(config);
  return out.c_str();
}

}  // namespace moeforge
