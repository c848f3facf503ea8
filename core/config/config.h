// defines: ExperimentConfig and its sections (ModelConfig, ParallelConfig, TrainingConfig,
//          DataConfig, CheckpointConfig, LoggingConfig, HardwareConfig) and their enums.
//
// The typed result of parsing an experiment YAML once (core/config/config_loader.h). Nothing downstream
// reads YAML. Key names are Megatron-LM's argument names in snake_case where Megatron has one;
// docs/config.md lists every key with its meaning and default. Fields declared std::optional are
// "derived when absent": resolve_derived_values() fills them, so after loading they always hold a
// value, except those documented as "null = off/absent" (num_experts,
// moe_shared_expert_intermediate_size, moe_expert_capacity_factor, world_size, save_interval,
// the uneven-pipeline sizes and peak_tflops).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

// Hugging Face family a model maps to for checkpoints (names of tensors, config.json).
enum class ModelType { qwen2_moe, mixtral, qwen2, llama };

// How the load-balancing loss is computed. aux_loss and seq_aux_loss are Megatron's per-layer
// losses; global_aux_loss is Megatron's per-layer loss with the expert loads of the global batch
// (summed over the data-parallel ranks, averaged over the step's micro-batches so far);
// hf_pooled_aux_loss is Hugging Face's loss over the router logits of all layers pooled.
enum class LoadBalancingType { aux_loss, seq_aux_loss, global_aux_loss, hf_pooled_aux_loss, none };

// Which slots a full expert drops when a capacity factor is set (Megatron's names).
enum class TokenDropPolicy { probs, position };

enum class LrDecayStyle { constant, linear, cosine };

enum class RecomputeGranularity { none, full, selective };

// What the trainer does when the loss or the gradient norm is not finite: stop (Megatron's
// default) or skip the update, count it and go on.
enum class NonFinitePolicy { stop, skip };

// whole: one Hugging Face checkpoint plus optimizer state, gathered to rank 0 (any layout resumes it).
// sharded: one directory per pipeline stage and expert-parallel rank, written by those ranks
// (`moeforge convert` turns one into the other or into another PP x EP layout).
enum class CheckpointFormat { whole, sharded };

enum class LogLevel { trace, debug, info, warn, error };

// model.kernels: our fused kernels (core/kernels) or the LibTorch compositions they replace.
enum class KernelChoice { fused, reference };

// parallel.device_collectives: how collectives move device tensors between ranks. nccl: NCCL, on
// CUDA only; host: through pinned host memory and MPI (parallel/comm/host_staged_communicator.h),
// for any accelerator.
enum class DeviceCollectives { nccl, host };

// Which layers are MoE: Megatron's --moe-layer-freq. An integer k makes layer i MoE when
// i % k == 0; an explicit list gives one 0/1 entry per layer (1 = MoE, 0 = dense FFN).
struct MoeLayerFreq {
  int64_t every = 1;             // used when `pattern` is empty
  std::vector<int64_t> pattern;  // explicit per-layer list, if given
};

struct ModelConfig {
  ModelType model_type = ModelType::qwen2_moe;
  int64_t num_layers = 0;
  int64_t hidden_size = 0;
  int64_t num_attention_heads = 0;
  std::optional<int64_t> num_query_groups;         // derived: num_attention_heads (MHA)
  std::optional<int64_t> kv_channels;              // derived: hidden_size / num_attention_heads
  std::optional<int64_t> ffn_hidden_size;          // derived: 4 * hidden_size (dense layers)
  int64_t vocab_size = 0;
  int64_t make_vocab_size_divisible_by = 128;
  std::optional<int64_t> max_position_embeddings;  // derived: training.seq_length
  double rotary_base = 10000.0;
  double norm_epsilon = 1e-5;
  bool add_qkv_bias = false;
  bool untie_embeddings_and_output_weights = false;
  double init_method_std = 0.02;

  // Mixture of experts. num_experts null = a dense model.
  std::optional<int64_t> num_experts;
  std::optional<int64_t> moe_ffn_hidden_size;  // derived: ffn_hidden_size
  int64_t moe_router_topk = 2;
  bool moe_router_pre_softmax = false;     // softmax over all experts, then top-k (Qwen, Mixtral)
  bool moe_router_norm_topk_prob = false;  // with pre-softmax: renormalize the k weights (Mixtral)
  LoadBalancingType moe_router_load_balancing_type = LoadBalancingType::aux_loss;
  // Benchmarks (Megatron's --moe-router-force-load-balancing): the router runs, but every expert
  // gets T*K/E slots (+-1); the loss is then not a training result.
  bool moe_router_force_load_balancing = false;
  // Aux-loss-free balancing (DeepSeek-V3, Megatron's --moe-router-enable-expert-bias): a per-expert
  // bias added to the router's scores for the top-k selection only, moved by
  // moe_router_bias_update_rate * sign(mean load - load) after every optimizer step.
  bool moe_router_enable_expert_bias = false;
  double moe_router_bias_update_rate = 1e-3;
  double moe_aux_loss_coeff = 0.0;
  double moe_z_loss_coeff = 0.0;
  std::optional<double> moe_expert_capacity_factor;  // null = dropless
  TokenDropPolicy moe_token_drop_policy = TokenDropPolicy::probs;
  std::optional<int64_t> moe_shared_expert_intermediate_size;  // null = no shared expert
  bool moe_shared_expert_gate = false;  // sigmoid(Linear(h -> 1)) scales the shared expert
  MoeLayerFreq moe_layer_freq;

  // How the math runs, not what it is: checkpoints and configs compare without it.
  KernelChoice kernels = KernelChoice::fused;

  // Derived quantities, valid after resolve_derived_values().
  int64_t padded_vocab_size() const;
  bool is_moe() const { return num_experts.has_value(); }
  bool is_moe_layer(int64_t layer) const;  // 0-based
  int64_t num_moe_layers() const;
  int64_t head_dim() const { return *kv_channels; }
  int64_t query_projection_size() const { return *kv_channels * num_attention_heads; }
  int64_t kv_projection_size() const { return *kv_channels * *num_query_groups; }
};

struct ParallelConfig {
  // The world size the experiment is meant for; null = whatever the launcher starts. When set, a
  // launch with a different number of ranks is refused.
  std::optional<int64_t> world_size;
  // Megatron's tensor parallelism: attention heads, the FFN widths and each routed expert's width
  // are split over TP ranks (the experts' tensor-parallel size is TP, Megatron-Core's default); the
  // embedding, the head, norms and routers are replicated.
  int64_t tensor_model_parallel_size = 1;
  // Megatron's --sequence-parallel (needs TP > 1): outside the split blocks each TP rank keeps
  // 1/TP of the sequence, so norms, the embedding output, the head and the loss run on a chunk,
  // and the blocks' all-reduces become an all-gather before and a reduce-scatter after.
  bool sequence_parallel = false;
  int64_t pipeline_model_parallel_size = 1;
  // Model chunks per pipeline rank (Megatron's virtual pipeline stages): the layers are cut into
  // PP x V chunks and rank r runs chunks r, r + PP, ...; the interleaved 1F1B schedule divides
  // the bubble by V for V times the pipeline messages. 1 = the plain 1F1B.
  int64_t virtual_pipeline_model_parallel_size = 1;
  int64_t expert_model_parallel_size = 1;
  // Uneven pipelines (Megatron's names): layers on the first / last stage; the rest are split
  // evenly over the middle stages.
  std::optional<int64_t> decoder_first_pipeline_num_layers;
  std::optional<int64_t> decoder_last_pipeline_num_layers;
  bool use_distributed_optimizer = false;
  double distributed_timeout_minutes = 10.0;
  // Data-parallel gradient buckets reduced while the backward still runs (false: after it, blocking).
  bool overlap_comm = true;
  // Elements per data-parallel gradient bucket (Megatron's --ddp-bucket-size); 0: Megatron's default,
  // max(40M, 1M x DP).
  int64_t ddp_bucket_size = 0;
  // null: nccl on CUDA, host on every other accelerator.
  std::optional<DeviceCollectives> device_collectives;
};

// The most samples a run counts, 2^53 (9.0e15, thousands of times any training run's): every count
// up to it is exact as a double (the LR schedule's arithmetic, metrics.jsonl). validate_config keeps
// the samples a run's schedule spans below it and a checkpoint's counters are refused above it
// (launch/train/train_state.h), so the one added to the other never overflows 64 bits.
inline constexpr int64_t kMaxSamples = int64_t{1} << 53;

struct TrainingConfig {
  int64_t seq_length = 0;
  int64_t micro_batch_size = 1;
  int64_t global_batch_size = 0;
  int64_t train_iters = 0;
  double lr = 0.0;
  double min_lr = 0.0;
  LrDecayStyle lr_decay_style = LrDecayStyle::linear;
  std::optional<int64_t> lr_decay_iters;  // derived: train_iters
  int64_t lr_warmup_iters = 0;
  double weight_decay = 0.01;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  double clip_grad = 1.0;
  bool bf16 = false;
  bool deterministic = false;
  RecomputeGranularity recompute_granularity = RecomputeGranularity::none;
  int64_t seed = 1234;
  int64_t eval_interval = 1000;
  int64_t eval_iters = 100;
  NonFinitePolicy on_nonfinite = NonFinitePolicy::stop;
  // Freezing by parameter-name glob (`*` any run of characters, `?` one): empty `trainable` = all
  // parameters train; `frozen` is applied after it. Frozen parameters get no gradient and no
  // optimizer state.
  std::vector<std::string> trainable;
  std::vector<std::string> frozen;
  // Megatron's early exits (launch/train/exit_conditions.h): each stops every rank after the same
  // iteration, saves a checkpoint and exits 0.
  bool exit_signal_handler = false;
  std::string exit_signal = "SIGTERM";  // a name of kExitSignals (core/base/signals.h)
  std::optional<double> exit_duration_in_mins;  // null = no time limit
  std::optional<int64_t> exit_interval;         // null = none
};

struct DataConfig {
  // Megatron's --data-path: one prefix, or "weight prefix weight prefix ..." for a blend.
  std::vector<std::string> data_path;
  std::string split = "969, 30, 1";
  std::string tokenizer_model;  // a Hugging Face tokenizer.json, or "byte"
  std::string data_cache_path;  // empty = <dataset dir>/cache/GPTDataset_indices
  bool reset_position_ids = false;
  bool eod_mask_loss = false;
};

struct CheckpointConfig {
  std::string save;  // directory to save into; empty = no checkpoints
  std::string load;  // directory to resume from; empty = start fresh
  std::optional<int64_t> save_interval;  // null = only at the end
  int64_t keep_latest_k = 0;             // checkpoints kept in `save`; 0 = all
  double save_timeout_minutes = 60.0;    // how long the other ranks wait for a save's writers
  CheckpointFormat format = CheckpointFormat::whole;
  // A save directory holding iter_* directories but no tracker (deleted or never written) would
  // start a fresh run that saves over them: refused unless this is set.
  bool overwrite = false;
  // A resume whose datasets differ from those the checkpoint recorded (launch/train/train_state.h)
  // is refused unless this is set: it would continue on another sample order.
  bool allow_dataset_change = false;
};

struct LoggingConfig {
  int64_t log_interval = 1;
  LogLevel log_level = LogLevel::info;
  std::string run_dir;  // derived: runs/<config file stem>
  // TensorBoard event files of the step line's scalars (Megatron's --tensorboard-dir); empty = none.
  std::string tensorboard_dir;
  // Megatron's --profile: rank 0's iterations [profile_step_start, profile_step_end) recorded by
  // LibTorch's profiler into <run_dir>/profile/.
  bool profile = false;
  int64_t profile_step_start = 10;
  int64_t profile_step_end = 12;
  // Every this many iterations (and the last), every MoE layer's tokens per expert over the global
  // batch into <run_dir>/expert_loads.jsonl; 0 = never.
  int64_t expert_loads_interval = 10;
};

struct HardwareConfig {
  // A LibTorch device type: cpu, cuda, emulated (moeforge's own accelerator, core/device/emulated),
  // or one a vendor's backend library registers (device_library).
  std::string device = "cpu";
  // A LibTorch backend library loaded at start-up before the device is resolved (a vendor's
  // PrivateUse1 backend); empty = none, or for `emulated` the emulator built beside moeforge.
  std::string device_library;
  // The emulated accelerator's memory per device (an H100's 80 GiB by default) and devices per node
  // (null = one per local rank).
  double emulated_memory_gib = 80.0;
  std::optional<int64_t> emulated_devices_per_node;
  // The emulated device's stream-order checker (core/device/emulated/emulated_stream_check.h): each
  // race between streams is reported, and a run that had any ends with an error.
  bool emulated_stream_check = false;
  std::string chip;                    // e.g. "H100"; empty = detect
  std::optional<double> peak_tflops;   // null = table of known chips, or CPU calibration
  int64_t num_threads = 0;             // intra-op threads per rank; 0 = LibTorch's default
  // A benchmark case's own parameter count for its 6N MFU (FlagPerf's literal N, e.g. 2.3e9),
  // reported beside ours so a row compares with the case's published table; null = none.
  std::optional<double> reference_compute_n;
};

// What a config is loaded for: a training run (every required key, every check), or only its
// model section (`moeforge upcycle` builds a model and trains nothing): keys outside `model` may
// then be absent, and only the model is validated.
enum class ConfigUse { training, model_only };

struct ExperimentConfig {
  ModelConfig model;
  ParallelConfig parallel;
  TrainingConfig training;
  DataConfig data;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  HardwareConfig hardware;
};

}  // namespace moeforge

#include <span>
#include <string_view>
#include <utility>

namespace moeforge {

// Names of each enum's values as written in YAML (the enumerator names). Specialized in
// core/config/config.cpp for every enum above.
template <typename E>
std::span<const std::pair<E, std::string_view>> enum_names();

template <typename E>
std::string_view to_string(E value) {
  for (const auto& [v, name] : enum_names<E>()) {
    if (v == value) return name;
  }
  return "?";
}

}  // namespace moeforge
