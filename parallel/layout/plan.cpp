#include "parallel/layout/plan.h"

#include "core/base/checked_int.h"
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
  Plan plan{config_path, layout, {}, 0, 0, {}, 0, 0, 0, 0, 0, 0, {}, {}};
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
  const N V = m.padded_vocab_size();
  const N h = m.hidden_size;
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
      dense += m.untie_embeddings_and_output_weights ? V * h : N(0);
    }
    // logits + fp32 loss copy; sequence parallelism runs the head on this rank's chunk
    const N logits = last ? tokens_per_mb / (SP ? TP : 1) * V * (weight_bytes + 4) : N(0);
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
  return plan;
}

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
        {"embedding", P.embedding},
        {"output_layer", P.output_layer},
        {"per_layer", plan.parameters_per_layer},
        {"activated_per_layer", plan.activated_parameters_per_layer}}},
      {"flops",
       {{"per_token", {{"megatron", plan.flops_per_token_megatron},
                       {"megatron_legacy", plan.flops_per_token_megatron_legacy},
                       {"six_n", plan.flops_per_token_six_n}}},
        {"per_step", {{"megatron", plan.flops_per_step.megatron},
                      {"megatron_legacy", plan.flops_per_step.megatron_legacy},
                      {"six_n", plan.flops_per_step.six_n}}}}},
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
        {"stages", stages}}},
      {"warnings", plan.warnings},
  };
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
  o << fmt::format("  per layer (activated)       {:>18} ({})\n", with_commas(plan.parameters_per_layer),
                   with_commas(plan.activated_parameters_per_layer));
  o << "\nmodel FLOPs              per token       per step\n";
  o << fmt::format("  Megatron (causal)     {:>8.3f} GFLOP  {:.4e}\n", plan.flops_per_token_megatron / 1e9,
                   static_cast<double>(plan.flops_per_step.megatron));
  o << fmt::format("  Megatron legacy       {:>8.3f} GFLOP  {:.4e}\n", plan.flops_per_token_megatron_legacy / 1e9,
                   static_cast<double>(plan.flops_per_step.megatron_legacy));
  o << fmt::format("  6N (FlagPerf)         {:>8.3f} GFLOP  {:.4e}\n", plan.flops_per_token_six_n / 1e9,
                   static_cast<double>(plan.flops_per_step.six_n));
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
  o << "  (act/mb: activations per micro-batch without / with full recomputation; peak: see docs/plan.md)\n";
  for (const auto& w : plan.warnings) o << "\nwarning: " << w << "\n";
  return o.str();
}

}  // namespace moeforge
