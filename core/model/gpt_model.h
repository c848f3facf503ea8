// defines: DecoderLayer, GPTModel, FeedForwardFactory, ModelOutput, lm_loss
//
// The decoder-only model: embedding, pre-norm decoder layers (attention, then a feed-forward part
// that is a dense MLP or, built by moe/, an MoE layer), final RMSNorm, LM head (tied or untied).
// Parameter names follow Hugging Face's Qwen2-MoE modules (`layers.{i}.self_attn.q_proj.weight`,
// `layers.{i}.mlp.experts.gate_up_proj`, ...) so checkpoint mapping is mechanical.
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include "core/config/config.h"
#include "core/model/transformer.h"

#include <functional>
#include <memory>
#include <vector>

namespace moeforge::model {

// Builds the feed-forward part of layer `layer`; moe/ passes one that makes MoE layers.
using FeedForwardFactory = std::function<std::shared_ptr<FeedForward>(const ModelConfig&, int64_t layer)>;

class DecoderLayerImpl : public torch::nn::Module {
 public:
  DecoderLayerImpl(const ModelConfig& config, int64_t layer, const FeedForwardFactory& make_ffn);
  // Returns the layer output; `ffn_out` receives the feed-forward part's routing statistics.
  torch::Tensor forward(const torch::Tensor& x_BSD, const torch::Tensor& cos, const torch::Tensor& sin,
                        FeedForwardOutput& ffn_out);
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  Attention self_attn{nullptr};
  std::shared_ptr<FeedForward> mlp;
};
TORCH_MODULE(DecoderLayer);

// What a run that reaches the head returns: the logits, or what the head would take (the final
// norm's output and the head's weight) for a loss that makes the logits itself, a chunk at a time
// (kernels::lm_head_cross_entropy: training never holds the whole [tokens, vocabulary] logits).
enum class HeadOutput { logits, head_input };

struct ModelOutput {
  torch::Tensor logits_BSV;                    // the head ran, HeadOutput::logits
  torch::Tensor head_input_BSD, head_weight_VD;  // the head's input and weight, HeadOutput::head_input
  bool head_weight_tied = false;                  // head_weight_VD is the embedding's (used twice)
  torch::Tensor hidden_BSD;                    // the run stopped before the head: the last layer's output
  std::vector<FeedForwardOutput> layers;       // per layer run, for the load-balancing losses
};

class GPTModelImpl : public torch::nn::Module {
 public:
  GPTModelImpl(const ModelConfig& config, const FeedForwardFactory& make_ffn);
  ModelOutput forward(const torch::Tensor& tokens_BS, const torch::Tensor& position_ids_BS);
  // Layers [begin, end) only (a pipeline stage runs one such slice): `input` is the tokens when
  // begin == 0 (the embedding runs), else the hidden states entering layer `begin`; the final norm
  // and head run when end == num_layers (as `head` says), else the output is hidden_BSD.
  ModelOutput forward_layers(const torch::Tensor& input, const torch::Tensor& position_ids_BS, int64_t begin, int64_t end,
                             HeadOutput head = HeadOutput::logits);
  const ModelConfig& config() const { return config_; }
  // training.recompute_granularity: full recomputes each decoder layer in backward, selective the
  // attention core; the results are the same, the memory is not.
  void set_recompute(RecomputeGranularity granularity);

  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  Linear lm_head{nullptr};  // null when tied to the embedding
  DecoderLayerImpl& layer(int64_t i) { return *layers->ptr<DecoderLayerImpl>(static_cast<size_t>(i)); }

 private:
  ModelConfig config_;
  RotaryEmbedding rope_;
  RecomputeGranularity recompute_ = RecomputeGranularity::none;
};
TORCH_MODULE(GPTModel);

// Mean cross-entropy in fp32 over the positions where loss_mask is 1 (labels already shifted), from
// the logits or from the head's input and weight (fused with the head, model.kernels).
// `loss_tokens` (a device scalar): the mean's denominator when labels_BS is a part of the tokens it
// is over (a sequence-parallel chunk of the micro-batch); undefined: the mask's count.
torch::Tensor lm_loss(const ModelOutput& out, const torch::Tensor& labels_BS, const torch::Tensor& loss_mask_BS,
                      const torch::Tensor& loss_tokens = {});

// Megatron's initialization: normal(0, std) for weights, std / sqrt(2 * num_layers) for the output
// projections of each block (o_proj, down projections), ones for norms, zeros for biases. Each
// parameter draws from its own stream, derived from the seed and its name (and, for stacked expert
// weights, each expert's block from the expert's index), so a rank that materialises only some
// parameters, or only some experts, gets exactly the values the whole model has.
//
// The whole model: parameters still on the meta device are first allocated on the CPU (fp32).
void init_megatron(GPTModelImpl& model, uint64_t seed);
// One parameter `t` (any device): `name` is its name in the whole model; for stacked expert
// weights `first_block` is the global index of its first block (its first expert).
void init_megatron_parameter(const ModelConfig& config, const std::string& name, torch::Tensor& t, uint64_t seed,
                             std::optional<int64_t> first_block = std::nullopt);

}  // namespace moeforge::model
