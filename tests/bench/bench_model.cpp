// Model benchmark (run by hand; results in docs/model.md): forward + backward tokens/s of our
// Qwen2-MoE against `transformers`' on the same CPU, same thread count, same shapes, measured in
// one run; then where our time goes (each part timed alone, forward + backward).
//   build/tests/bench/bench_model [THREADS]
#include "core/model/gpt_model.h"
#include "moe/model_loss.h"
#include "moe/moe_layer.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>

using namespace moeforge;

namespace {
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <typename F>
double median_seconds(int steps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i <= steps; ++i) {
    const double a = now();
    f();
    t.push_back(now() - a);
  }
  t.erase(t.begin());  // warm-up
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  torch::set_num_threads(threads);
  const nlohmann::json spec = {{"vocab", 4096}, {"hidden", 256}, {"layers", 4},   {"heads", 8},       {"kv_heads", 4},
                               {"ffn", 1024},   {"expert_ffn", 64}, {"shared_ffn", 256}, {"experts", 60}, {"topk", 4},
                               {"seq", 256},    {"batch", 4},     {"steps", 5}};
  ModelConfig c;
  c.vocab_size = spec["vocab"];
  c.hidden_size = spec["hidden"];
  c.num_layers = spec["layers"];
  c.num_attention_heads = spec["heads"];
  c.num_query_groups = spec["kv_heads"].get<int64_t>();
  c.kv_channels = c.hidden_size / c.num_attention_heads;
  c.ffn_hidden_size = spec["ffn"].get<int64_t>();
  c.moe_ffn_hidden_size = spec["expert_ffn"].get<int64_t>();
  c.moe_shared_expert_intermediate_size = spec["shared_ffn"].get<int64_t>();
  c.moe_shared_expert_gate = true;
  c.num_experts = spec["experts"].get<int64_t>();
  c.moe_router_topk = spec["topk"];
  c.moe_router_pre_softmax = true;
  c.add_qkv_bias = true;
  c.untie_embeddings_and_output_weights = true;
  c.max_position_embeddings = spec["seq"].get<int64_t>();
  c.moe_router_load_balancing_type = LoadBalancingType::hf_pooled_aux_loss;
  c.moe_aux_loss_coeff = 0.001;
  const int64_t B = spec["batch"], S = spec["seq"];
  const int steps = spec["steps"];

  auto model = moe::build_model(c);
  model::init_megatron(*model, 0);
  const auto tokens = torch::randint(0, c.vocab_size, {B, S}, torch::kInt64);
  const auto positions = torch::arange(S, torch::kInt64).unsqueeze(0).expand({B, S});
  const auto mask = torch::ones({B, S});
  const double ours = median_seconds(steps, [&] {
    const auto out = model->forward(tokens, positions);
    moe::model_loss(c, out, tokens, mask).total.backward();
    model->zero_grad(true);
  });

  const std::string cmd = fmt::format("{} {}/tests/bench/hf_model_throughput.py {} '{}' 2>/dev/null", MOEFORGE_PYTHON,
                                      MOEFORGE_SOURCE_DIR, threads, spec.dump());
  std::FILE* pipe = popen(cmd.c_str(), "r");
  char buf[4096] = {};
  const size_t got = std::fread(buf, 1, sizeof(buf) - 1, pipe);
  pclose(pipe);
  const auto hf = nlohmann::json::parse(std::string(buf, got));
  const double theirs = hf["seconds_per_step"].get<double>();
  const double tokens_per_step = static_cast<double>(B * S);
  fmt::print("Qwen2-MoE h={} L={} E={} top-{} (+shared), batch {} x seq {}, {} threads, fp32, fwd+bwd median of {}\n",
             c.hidden_size, c.num_layers, *c.num_experts, c.moe_router_topk, B, S, threads, steps);
  fmt::print("  transformers  {:8.1f} tokens/s  ({:.3f} s/step)\n", tokens_per_step / theirs, theirs);
  fmt::print("  moeforge      {:8.1f} tokens/s  ({:.3f} s/step)   {:.2f}x\n", tokens_per_step / ours, ours, theirs / ours);

  // Where our time goes: each part alone, forward + backward, per layer (x layers).
  const auto x_BSD = torch::randn({B, S, c.hidden_size}, torch::requires_grad());
  auto layer = model->layers[0]->as<model::DecoderLayer>();
  auto moe = std::dynamic_pointer_cast<moe::MoELayer>(layer->mlp);
  model::RotaryEmbedding rope(c.head_dim(), c.rotary_base);
  const auto [cos, sin] = rope.tables(positions, torch::kFloat32);
  auto part = [&](const char* name, auto&& f) {
    const double s = median_seconds(steps, [&] {
      f().sum().backward();
      model->zero_grad(true);
    });
    fmt::print("  {:<34} {:7.2f} ms/layer  {:5.1f} % of a step\n", name, 1e3 * s, 100.0 * s * static_cast<double>(c.num_layers) / ours);
  };
  fmt::print("where the time goes (fwd+bwd, per layer, share of the whole step over {} layers):\n", c.num_layers);
  part("RMSNorm x2", [&] { return layer->input_layernorm(x_BSD) + layer->post_attention_layernorm(x_BSD); });
  part("attention (qkv, RoPE, SDPA, o_proj)", [&] { return layer->self_attn(x_BSD, cos, sin); });
  part("MoE block (all of it)", [&] { return moe->forward(x_BSD).y; });
  const auto x_TD = x_BSD.reshape({-1, c.hidden_size});
  const auto routing = moe->gate(x_TD.detach());
  moe::LocalDispatcher dispatcher(*c.num_experts);
  part("  router", [&] { return moe->gate(x_TD).weights_TK; });
  part("  dispatch + combine", [&] {
    const auto d = dispatcher.dispatch(x_TD, routing.experts_TK);
    return dispatcher.combine(d.x_ND, d, routing.weights_TK.detach());
  });
  const auto sent = dispatcher.dispatch(x_TD.detach(), routing.experts_TK);
  const auto x_ND = sent.x_ND.clone().requires_grad_();
  part("  routed expert matmuls", [&] { return moe->experts(x_ND, sent.rows_per_local_expert); });
  part("  shared expert + gate", [&] {
    return torch::sigmoid(moe->shared_expert_gate(x_TD)) * moe->shared_expert(x_TD);
  });
  const auto h_BSD = torch::randn({B, S, c.hidden_size}, torch::requires_grad());
  const double head = median_seconds(steps, [&] {
    model::ModelOutput out;
    out.head_input_BSD = model->norm(h_BSD);
    out.head_weight_VD = model->lm_head->weight;
    moe::model_loss(c, out, tokens, mask).lm.backward();
    model->zero_grad(true);
  });
  fmt::print("  {:<34} {:7.2f} ms/step   {:5.1f} % of a step\n", "final norm + LM head + loss", 1e3 * head, 100.0 * head / ours);
  return 0;
}
