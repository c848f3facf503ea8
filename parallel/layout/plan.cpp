#include "parallel/layout/plan.h"

#include "core/base/checked_int.h"
#include "core/flops/conventions.h"
#include "parallel/layout/pipeline_schedule.h"

#include <fmt/format.h>

#include <algorithm>
#include <sstream>

namespace moeforge {

namespace {

// Sizes come from configs: every product is checked (core/base/checked_int.h).
using N = CheckedInt;

// Activation bytes kept for backward per token of one layer, as our implementation stores them
// (docs/plan.md derives each term). `e` is the bytes of one activation element.
// Per token of one TP rank: what tensor parallelism splits (heads, widths) divided by `tp`, the
// layer's inputs, norms and dispatched rows whole on every rank. With sequence parallelism (`sp`)
// the norms' inputs and outputs hold 1/tp of the tokens, and each block keeps the gathered
// sequence its split weights read (the MoE router reads a view of the same values).
N layer_activation_bytes_per_token(const ModelConfig& m, int64_t layer, int64_t e, int64_t tp, bool sp) {
  const N h = m.hidden_size;
  // A block's norm input and output, and the gathered input under sequence parallelism.
  const N norms = sp ? 2 * h / tp + h : 2 * h;
  const N q = m.query_projection_size() / tp;
  const N kv = m.kv_projection_size() / tp;
  // attention: norm input and output, q/k/v after RoPE, attention output; flash attention keeps
  // one fp32 log-sum-exp per head instead of the s x s scores.
  N bytes = e * (norms + q + 2 * kv + q) + 4 * N(m.num_attention_heads) / tp;
  if (m.is_moe_layer(layer)) {
    const N k = m.moe_router_topk;
    const N f = *m.moe_ffn_hidden_size / tp;
    const N fs = m.moe_shared_expert_intermediate_size.value_or(0) / tp;
    // norm input and output, k dispatched rows, k expert outputs, gate/up/product per slot,
    // shared expert gate/up/product and output, fp32 router logits and probabilities.
    bytes += e * (norms + 2 * k * h + 3 * k * f + (fs.v > 0 ? 3 * fs + h : N(0))) + 8 * N(*m.num_experts);
  } else {
    bytes += e * (norms + 3 * N(*m.ffn_hidden_size) / tp);
  }
  return bytes;
}

// Whether the LM head's loss runs fused on the configured device: core/kernels/kernels.cpp has the
// kernel for the CPU and CUDA; any other accelerator (the emulated one, a vendor's) runs the
// reference. A self-check that fails at start-up also falls back to it, which no plan foresees.
bool loss_runs_fused(const ExperimentConfig& c) {
  return c.model.kernels == KernelChoice::fused && (c.hardware.device == "cpu" || c.hardware.device == "cuda");
}

// Bytes the last stage holds for the head and the loss of one micro-batch of `tokens` rows.
// Reference: the whole [T, V] logits in fp32 (in bf16 the cast copy; the bf16 logits are freed once
// cast), log-softmax's fp32 output kept for backward, and the fp32 gradient made beside them: 12
// bytes per logit whatever the dtype, as the emulated device measures (docs/plan.md).
// Fused: the input's gradient dh [T, D], made in the forward and kept; one chunk of logits at a
// time; for a tied head the fp32 accumulator of the weight's gradient [V, D] (an untied head adds
// into its main_grad, counted with the gradients).
N head_bytes(const ModelConfig& m, N tokens, int64_t e, bool fused) {
  const N V = m.padded_vocab_size(), h = m.hidden_size;
  if (!fused) return tokens * V * 12;
  const N chunk = std::min(kLossChunkBytes, (tokens * V * e).v);
  return tokens * h * e + chunk + (m.untie_embeddings_and_output_weights ? N(0) : V * h * 4);
}

// What one save writes, and what each format holds while writing it.
CheckpointPlan checkpoint_plan(const Plan& plan, const ParallelLayout& layout, int64_t weight_bytes,
                               int64_t optim_bytes) {
  CheckpointPlan k;
  k.model_bytes = (N(plan.parameters.total) * weight_bytes).v;
  k.optimizer_bytes = (N(plan.parameters.total) * optim_bytes).v;
  k.whole_rank0_host_bytes = k.bytes();
  if (layout.tp() == 1) {  // the sharded format stores no tensor-parallel slices
    k.sharded_writers = (N(layout.pp()) * layout.ep()).v;
    for (const auto& s : plan.stages) {
      k.sharded_largest_shard_bytes = std::max(k.sharded_largest_shard_bytes, (N(s.parameters) * (weight_bytes + optim_bytes)).v);
    }
  }
  return k;
}

// A whole save beyond this much host memory on rank 0 is worth a warning: sharded spreads it.
constexpr int64_t kWholeSaveWarnBytes = int64_t{64} << 30;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string gib(int64_t bytes) { return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / kGiB); }

std::string with_commas(int64_t v) {
  const std::string digits = std::to_string(v < 0 ? -v : v);
  std::string out = v < 0 ? "-" : "";
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

}  // namespace

Plan make_plan(const ExperimentConfig& c, const std::string& config_path, const ParallelLayout& layout) {
  const ModelConfig& m = c.model;
  Plan plan{config_path, layout, {}, 0, 0, {}, 0, 0, 0, 0, 0, 0, {}, false, {}, {}, 0, 0, 0};
  plan.parameters = count_parameters(m);
  int64_t representative = 0;
  for (int64_t i = 0; i < m.num_layers; ++i) {
    if (m.is_moe_layer(i)) {
      representative = i;
      break;
    }
  }
  plan.parameters_per_layer = layer_parameters(m, representative).total();
  plan.activated_parameters_per_layer = layer_parameters(m, representative).activated();

  const int64_t seq = c.training.seq_length;
  plan.tokens_per_step = checked_product(c.training.global_batch_size, seq);
  plan.flops_per_step = model_flops_per_step(m, c.training.global_batch_size, seq);
  const auto per_token = [&](int64_t f) { return static_cast<double>(f) / static_cast<double>(plan.tokens_per_step); };
  plan.flops_per_token_megatron = per_token(plan.flops_per_step.megatron);
  plan.flops_per_token_megatron_legacy = per_token(plan.flops_per_step.megatron_legacy);
  plan.flops_per_token_six_n = per_token(plan.flops_per_step.six_n);
  plan.flops_per_token_torchtitan = per_token(plan.flops_per_step.torchtitan);
  plan.hardware_flops_per_step = hardware_flops_per_step(m, c.training.global_batch_size, seq, c.training.recompute_granularity);
  plan.hardware_flops_per_token = per_token(plan.hardware_flops_per_step);

  const int64_t PP = layout.pp(), M = layout.micro_batches_per_step(), VP = layout.vpp(), TP = layout.tp();
  const bool SP = layout.sequence_parallel();
  // Interleaving divides the bubble's share of the step by V (Megatron's (PP - 1) / (V M)).
  plan.bubble_fraction = static_cast<double>(PP - 1) / static_cast<double>((N(VP) * M + PP - 1).v);
  if (M < PP) {
    plan.warnings.push_back(fmt::format("{} micro-batches per step for {} pipeline stages: the pipeline never fills; "
                                        "raise training.global_batch_size or lower PP",
                                        M, PP));
  }

  // Memory per rank of each stage.
  const bool bf16 = c.training.bf16;
  const int64_t weight_bytes = bf16 ? 2 : 4;
  const int64_t grad_bytes = 4;              // gradients accumulate in fp32 either way
  const int64_t optim_bytes = bf16 ? 12 : 8;  // (fp32 master +) Adam m and v
  const N tokens_per_mb = N(c.training.micro_batch_size) * seq;
  const N h = m.hidden_size;
  plan.fused_loss = loss_runs_fused(c);
  plan.experts_per_ep_rank = layout.experts_per_rank();
  for (int64_t s = 0; s < PP; ++s) {
    StagePlan st;
    st.stage = s;
    st.chunks = layout.chunks(s);
    st.first_layer = st.chunks.front().begin;
    st.num_layers = layout.layers_per_stage()[static_cast<size_t>(s)];
    N dense = 0, experts = 0, act_full_layers = 0, act_checkpoints = 0, act_max_layer = 0;
    for (int64_t i = 0; i < m.num_layers; ++i) {
      if (layout.stage_of_layer(i) != s) continue;
      const LayerParameters p = layer_parameters(m, i);
      // Tensor parallelism splits the projections and widths; norms, router and the shared
      // expert's gate (h x 1) stay whole.
      const N shared_gate = p.shared_expert > 0 && m.moe_shared_expert_gate ? h : N(0);
      dense += (N(p.attention) + p.dense_ffn + p.shared_expert - shared_gate) / TP + p.norms + p.router + shared_gate;
      if (m.is_moe_layer(i)) experts += N(p.expert / TP) * layout.experts_per_rank();
      const N a = layer_activation_bytes_per_token(m, i, weight_bytes, TP, SP) * tokens_per_mb;
      act_full_layers += a;
      act_max_layer = std::max(act_max_layer.v, a.v);
      act_checkpoints += weight_bytes * h * tokens_per_mb / (SP ? TP : 1);  // full recompute keeps each layer's input
    }
    const bool first = s == 0, last = s == PP - 1;
    if (first) dense += plan.parameters.embedding;
    if (last) {
      dense += plan.parameters.final_norm;
      // A tied head is the embedding itself (ParallelLayout refuses tying under PP).
      dense += m.untie_embeddings_and_output_weights ? N(m.padded_vocab_size()) * h : N(0);
    }
    // sequence parallelism runs the head on this rank's chunk of the tokens
    const N logits = last ? head_bytes(m, tokens_per_mb / (SP ? TP : 1), weight_bytes, plan.fused_loss) : N(0);
    st.parameters = (dense + experts).v;
    st.expert_parameters = experts.v;
    st.weight_bytes = (N(st.parameters) * weight_bytes).v;
    st.gradient_bytes = (N(st.parameters) * grad_bytes).v;
    st.optimizer_bytes = (N(st.parameters) * optim_bytes).v;
    st.optimizer_bytes_distributed = (dense * optim_bytes / layout.dp() + experts * optim_bytes / layout.edp()).v;
    st.activation_bytes_per_micro_batch = (act_full_layers + logits).v;
    st.activation_bytes_per_micro_batch_full_recompute = (act_checkpoints + act_max_layer + logits).v;
    st.micro_batches_in_flight = peak_in_flight(pipeline_schedule(PP, s, VP, M, false));
    const int64_t optimizer =
        c.parallel.use_distributed_optimizer ? st.optimizer_bytes_distributed : st.optimizer_bytes;
    // A chunk-micro-batch in flight holds 1/V of the stage's layers' activations.
    const N activations = c.training.recompute_granularity == RecomputeGranularity::full
                              ? st.micro_batches_in_flight * act_checkpoints / VP + act_max_layer + logits
                              : st.micro_batches_in_flight * act_full_layers / VP + logits;
    st.peak_bytes = (N(st.weight_bytes) + st.gradient_bytes + optimizer + activations).v;
    plan.stages.push_back(st);
  }
  plan.checkpoint = checkpoint_plan(plan, layout, weight_bytes, optim_bytes);
  if (!c.checkpoint.save.empty() && c.checkpoint.format == CheckpointFormat::whole &&
      plan.checkpoint.whole_rank0_host_bytes > kWholeSaveWarnBytes) {
    plan.warnings.push_back(fmt::format(
        "each whole save gathers {:.1f} GiB into rank 0's host memory and writes it from that one process; {}",
        static_cast<double>(plan.checkpoint.whole_rank0_host_bytes) / (1LL << 30),
        plan.checkpoint.sharded_writers
            ? fmt::format("set checkpoint.format: sharded to have {} ranks write their own parts", plan.checkpoint.sharded_writers)
            : std::string("the sharded format, which spreads it, needs tensor_model_parallel_size 1")));
  }
  return plan;
}

namespace {

// Every MFU convention with its formula, and where the run's peak will come from: what a row of
// `moeforge report` names, so plan and report read the same.
nlohmann::json mfu_conventions_json(const HardwareConfig& hw) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& m : mfu_conventions()) out[m.key] = {{"name", m.name}, {"formula", m.formula}};
  out["peak_source"] = planned_peak_source(hw);
  return out;
}

std::string format_mfu_conventions(const HardwareConfig& hw) {
  std::string o = "\nMFU conventions (each over step time x devices x the peak)\n";
  for (const auto& m : mfu_conventions()) o += fmt::format("  {:<28} {}\n", m.name, m.formula);
  return o + fmt::format("  {:<28} {}\n", "peak", planned_peak_source(hw));
}

}  // namespace

nlohmann::json plan_to_json(const Plan& plan, const ExperimentConfig& c) {
  using nlohmann::json;
  const auto& P = plan.parameters;
  json stages = json::array();
  for (const auto& s : plan.stages) {
    stages.push_back({{"stage", s.stage},
                      {"first_layer", s.first_layer},
                      {"layers", format_layer_ranges(s.chunks)},
                      {"num_layers", s.num_layers},
                      {"parameters", s.parameters},
                      {"expert_parameters", s.expert_parameters},
                      {"weight_bytes", s.weight_bytes},
                      {"gradient_bytes", s.gradient_bytes},
                      {"optimizer_bytes", s.optimizer_bytes},
                      {"optimizer_bytes_distributed", s.optimizer_bytes_distributed},
                      {"activation_bytes_per_micro_batch", s.activation_bytes_per_micro_batch},
                      {"activation_bytes_per_micro_batch_full_recompute", s.activation_bytes_per_micro_batch_full_recompute},
                      {"micro_batches_in_flight", s.micro_batches_in_flight},
                      {"peak_bytes", s.peak_bytes}});
  }
  const auto& L = plan.layout;
  return json{
      {"config", plan.config_path},
      {"layout",
       {{"world_size", L.world()},
        {"tensor_model_parallel_size", L.tp()},
        {"sequence_parallel", L.sequence_parallel()},
        {"pipeline_model_parallel_size", L.pp()},
        {"data_parallel_size", L.dp()},
        {"expert_model_parallel_size", L.ep()},
        {"expert_data_parallel_size", L.edp()},
        {"layers_per_stage", L.layers_per_stage()},
        {"experts_per_ep_rank", plan.experts_per_ep_rank}}},
      {"parameters",
       {{"total", P.total},
        {"activated", P.activated},
        {"activated_non_embedding", P.activated_non_embedding},
        {"flagperf_compute_n", P.flagperf_compute_n},
        {"torchtitan_n", P.torchtitan_n},
        {"embedding", P.embedding},
        {"output_layer", P.output_layer},
        {"per_layer", plan.parameters_per_layer},
        {"activated_per_layer", plan.activated_parameters_per_layer}}},
      {"flops",
       {{"per_token", {{"megatron", plan.flops_per_token_megatron},
                       {"megatron_legacy", plan.flops_per_token_megatron_legacy},
                       {"six_n", plan.flops_per_token_six_n},
                       {"torchtitan", plan.flops_per_token_torchtitan},
                       {"hardware", plan.hardware_flops_per_token}}},
        {"per_step", {{"megatron", plan.flops_per_step.megatron},
                      {"megatron_legacy", plan.flops_per_step.megatron_legacy},
                      {"six_n", plan.flops_per_step.six_n},
                      {"torchtitan", plan.flops_per_step.torchtitan},
                      {"hardware", plan.hardware_flops_per_step}}},
        {"conventions", mfu_conventions_json(c.hardware)}}},
      {"batch",
       {{"global_batch_size", c.training.global_batch_size},
        {"micro_batch_size", c.training.micro_batch_size},
        {"seq_length", c.training.seq_length},
        {"micro_batches_per_step", L.micro_batches_per_step()},
        {"tokens_per_step", plan.tokens_per_step}}},
      {"pipeline",
       {{"schedule", L.vpp() > 1 ? "interleaved_1f1b" : "1f1b"},
        {"virtual_pipeline_model_parallel_size", L.vpp()},
        {"bubble_fraction", plan.bubble_fraction}}},
      {"memory",
       {{"precision", c.training.bf16 ? "bf16" : "fp32"},
        {"use_distributed_optimizer", c.parallel.use_distributed_optimizer},
        {"recompute_granularity", std::string(to_string(c.training.recompute_granularity))},
        {"fused_loss", plan.fused_loss},
        {"stages", stages}}},
      {"checkpoint",
       {{"format", std::string(to_string(c.checkpoint.format))},
        {"model_bytes", plan.checkpoint.model_bytes},
        {"optimizer_bytes", plan.checkpoint.optimizer_bytes},
        {"bytes", plan.checkpoint.bytes()},
        {"whole_rank0_host_bytes", plan.checkpoint.whole_rank0_host_bytes},
        {"sharded_writers", plan.checkpoint.sharded_writers},
        {"sharded_largest_shard_bytes", plan.checkpoint.sharded_largest_shard_bytes},
        {"save_timeout_minutes", c.checkpoint.save_timeout_minutes}}},
      {"warnings", plan.warnings},
  };
}

// Both formats, so a user choosing between them sees what each would cost; the configured one marked.
std::string format_checkpoint(const CheckpointPlan& k, const ExperimentConfig& c) {
  const auto& cc = c.checkpoint;
  const bool whole = cc.format == CheckpointFormat::whole;
  std::ostringstream o;
  o << fmt::format("\ncheckpoint (one save; checkpoint.format: {}{})\n", to_string(cc.format),
                   cc.save.empty() ? ", but checkpoint.save is not set: no saves" : "");
  o << fmt::format("  writes {}: model {} ({}), optimizer {} ({}Adam m and v)\n", gib(k.bytes()), gib(k.model_bytes),
                   c.training.bf16 ? "bf16" : "fp32", gib(k.optimizer_bytes), c.training.bf16 ? "fp32 master, " : "");
  // The writers must finish within checkpoint.save_timeout_minutes, or the waiting ranks end the job.
  const double seconds = cc.save_timeout_minutes * 60.0;
  o << fmt::format("  {} whole:   rank 0 holds all {} in host memory and writes it alone: at least {:.0f} MB/s to "
                   "finish within checkpoint.save_timeout_minutes ({:g})\n",
                   whole ? "*" : " ", gib(k.whole_rank0_host_bytes), static_cast<double>(k.bytes()) / 1e6 / seconds,
                   cc.save_timeout_minutes);
  if (k.sharded_writers) {
    o << fmt::format("  {} sharded: {} ranks write in parallel (one per stage and EP rank), the largest {}: at least "
                     "{:.0f} MB/s each\n",
                     whole ? " " : "*", k.sharded_writers, gib(k.sharded_largest_shard_bytes),
                     static_cast<double>(k.sharded_largest_shard_bytes) / 1e6 / seconds);
  } else {
    o << fmt::format("  {} sharded: not available with tensor_model_parallel_size {} (shards hold no TP slices)\n",
                     whole ? " " : "*", c.parallel.tensor_model_parallel_size);
  }
  return o.str();
}

std::string format_plan(const Plan& plan, const ExperimentConfig& c) {
  std::ostringstream o;
  const auto& P = plan.parameters;
  o << fmt::format("plan for {}\n\n", plan.config_path);
  o << fmt::format("layout       {}\n", plan.layout.describe());
  if (plan.experts_per_ep_rank) o << fmt::format("             {} routed experts per expert-parallel rank\n", plan.experts_per_ep_rank);
  o << "\nparameters\n";
  o << fmt::format("  total                       {:>18}\n", with_commas(P.total));
  o << fmt::format("  activated                   {:>18}\n", with_commas(P.activated));
  o << fmt::format("  activated non-embedding     {:>18}\n", with_commas(P.activated_non_embedding));
  o << fmt::format("  FlagPerf compute N          {:>18}\n", with_commas(P.flagperf_compute_n));
  o << fmt::format("  torchtitan N - N_embedding  {:>18}\n", with_commas(P.torchtitan_n));
  o << fmt::format("  per layer (activated)       {:>18} ({})\n", with_commas(plan.parameters_per_layer),
                   with_commas(plan.activated_parameters_per_layer));
  o << "\nmodel FLOPs              per token       per step\n";
  o << fmt::format("  Megatron (causal)     {:>8.3f} GFLOP  {:.4e}\n", plan.flops_per_token_megatron / 1e9,
                   static_cast<double>(plan.flops_per_step.megatron));
  o << fmt::format("  Megatron legacy       {:>8.3f} GFLOP  {:.4e}\n", plan.flops_per_token_megatron_legacy / 1e9,
                   static_cast<double>(plan.flops_per_step.megatron_legacy));
  o << fmt::format("  6N (FlagPerf)         {:>8.3f} GFLOP  {:.4e}\n", plan.flops_per_token_six_n / 1e9,
                   static_cast<double>(plan.flops_per_step.six_n));
  o << fmt::format("  torchtitan            {:>8.3f} GFLOP  {:.4e}\n", plan.flops_per_token_torchtitan / 1e9,
                   static_cast<double>(plan.flops_per_step.torchtitan));
  o << fmt::format("  hardware (HFU)        {:>8.3f} GFLOP  {:.4e}  (recompute: {})\n", plan.hardware_flops_per_token / 1e9,
                   static_cast<double>(plan.hardware_flops_per_step), to_string(c.training.recompute_granularity));
  o << format_mfu_conventions(c.hardware);
  o << "\nbatch\n";
  o << fmt::format("  global batch {} x seq {} = {} tokens per step\n", c.training.global_batch_size,
                   c.training.seq_length, with_commas(plan.tokens_per_step));
  o << fmt::format("  micro-batch {} -> {} micro-batches per step per data-parallel rank\n",
                   c.training.micro_batch_size, plan.layout.micro_batches_per_step());
  if (plan.layout.vpp() > 1) {
    o << fmt::format("  interleaved 1F1B bubble (PP-1)/(V*M+PP-1), V = {}: {:.2f} %\n", plan.layout.vpp(),
                     100.0 * plan.bubble_fraction);
  } else {
    o << fmt::format("  1F1B bubble (PP-1)/(M+PP-1) = {:.2f} %\n", 100.0 * plan.bubble_fraction);
  }
  o << fmt::format("\nmemory per rank ({}, {} optimizer, recompute {})\n", c.training.bf16 ? "bf16" : "fp32",
                   c.parallel.use_distributed_optimizer ? "distributed" : "replicated",
                   to_string(c.training.recompute_granularity));
  const auto row = [&](const auto&... cells) {
    o << fmt::format("  {:>5}  {:>7}  {:>14}  {:>10}  {:>10}  {:>10}  {:>12}  {:>10}  {:>13}  {:>9}  {:>10}\n", cells...);
  };
  row("stage", "layers", "params/rank", "weights", "grads", "optimizer", "optim (dist)", "act/mb", "act/mb (full)",
      "in flight", "peak");
  for (const auto& s : plan.stages) {
    row(s.stage, format_layer_ranges(s.chunks), with_commas(s.parameters),
        gib(s.weight_bytes), gib(s.gradient_bytes), gib(s.optimizer_bytes), gib(s.optimizer_bytes_distributed),
        gib(s.activation_bytes_per_micro_batch), gib(s.activation_bytes_per_micro_batch_full_recompute),
        s.micro_batches_in_flight, gib(s.peak_bytes));
  }
  o << fmt::format("  (act/mb: activations per micro-batch without / with full recomputation; the last stage's include the "
                   "LM head's loss, {}; peak: see docs/plan.md)\n",
                   plan.fused_loss ? "fused (no whole logits)" : "the reference (whole logits)");
  o << format_checkpoint(plan.checkpoint, c);
  for (const auto& w : plan.warnings) o << "\nwarning: " << w << "\n";
  return o.str();
}

}  // namespace moeforge
