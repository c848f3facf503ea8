#include "core/config/config.h"

#include <array>

namespace moeforge {

namespace {
template <typename E, size_t N>
using Names = std::array<std::pair<E, std::string_view>, N>;

constexpr Names<ModelType, 4> kModelType{{{ModelType::qwen2_moe, "qwen2_moe"},
                                          {ModelType::mixtral, "mixtral"},
                                          {ModelType::qwen2, "qwen2"},
                                          {ModelType::llama, "llama"}}};
constexpr Names<LoadBalancingType, 5> kLoadBalancing{
    {{LoadBalancingType::aux_loss, "aux_loss"},
     {LoadBalancingType::seq_aux_loss, "seq_aux_loss"},
     {LoadBalancingType::global_aux_loss, "global_aux_loss"},
     {LoadBalancingType::hf_pooled_aux_loss, "hf_pooled_aux_loss"},
     {LoadBalancingType::none, "none"}}};
constexpr Names<TokenDropPolicy, 2> kDropPolicy{
    {{TokenDropPolicy::probs, "probs"}, {TokenDropPolicy::position, "position"}}};
constexpr Names<LrDecayStyle, 3> kDecay{{{LrDecayStyle::constant, "constant"},
                                         {LrDecayStyle::linear, "linear"},
                                         {LrDecayStyle::cosine, "cosine"}}};
constexpr Names<RecomputeGranularity, 3> kRecompute{{{RecomputeGranularity::none, "none"},
                                                     {RecomputeGranularity::full, "full"},
                                                     {RecomputeGranularity::selective, "selective"}}};
constexpr Names<NonFinitePolicy, 2> kNonFinite{{{NonFinitePolicy::stop, "stop"}, {NonFinitePolicy::skip, "skip"}}};
constexpr Names<CheckpointFormat, 2> kCheckpointFormat{
    {{CheckpointFormat::whole, "whole"}, {CheckpointFormat::sharded, "sharded"}}};
constexpr Names<LogLevel, 5> kLogLevel{{{LogLevel::trace, "trace"},
                                        {LogLevel::debug, "debug"},
                                        {LogLevel::info, "info"},
                                        {LogLevel::warn, "warn"},
                                        {LogLevel::error, "error"}}};
constexpr Names<KernelChoice, 2> kKernelChoice{{{KernelChoice::fused, "fused"}, {KernelChoice::reference, "reference"}}};
constexpr Names<DeviceCollectives, 2> kDeviceCollectives{
    {{DeviceCollectives::nccl, "nccl"}, {DeviceCollectives::host, "host"}}};
}  // namespace

template <>
std::span<const std::pair<ModelType, std::string_view>> enum_names<ModelType>() { return kModelType; }
template <>
std::span<const std::pair<LoadBalancingType, std::string_view>> enum_names<LoadBalancingType>() {
  return kLoadBalancing;
}
template <>
std::span<const std::pair<TokenDropPolicy, std::string_view>> enum_names<TokenDropPolicy>() {
  return kDropPolicy;
}
template <>
std::span<const std::pair<LrDecayStyle, std::string_view>> enum_names<LrDecayStyle>() { return kDecay; }
template <>
std::span<const std::pair<RecomputeGranularity, std::string_view>> enum_names<RecomputeGranularity>() {
  return kRecompute;
}
template <>
std::span<const std::pair<NonFinitePolicy, std::string_view>> enum_names<NonFinitePolicy>() {
  return kNonFinite;
}
template <>
std::span<const std::pair<CheckpointFormat, std::string_view>> enum_names<CheckpointFormat>() {
  return kCheckpointFormat;
}
template <>
std::span<const std::pair<LogLevel, std::string_view>> enum_names<LogLevel>() { return kLogLevel; }
template <>
std::span<const std::pair<KernelChoice, std::string_view>> enum_names<KernelChoice>() { return kKernelChoice; }
template <>
std::span<const std::pair<DeviceCollectives, std::string_view>> enum_names<DeviceCollectives>() {
  return kDeviceCollectives;
}

int64_t ModelConfig::padded_vocab_size() const {
  // Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (times TP, which
  // is 1 here) so the embedding shards evenly and matrix shapes stay aligned.
  const int64_t m = make_vocab_size_divisible_by;
  return (vocab_size + m - 1) / m * m;
}

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (!num_experts) return false;
  if (!moe_layer_freq.pattern.empty()) return moe_layer_freq.pattern.at(layer) == 1;
  return layer % moe_layer_freq.every == 0;
}

int64_t ModelConfig::num_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < num_layers; ++i) n += is_moe_layer(i) ? 1 : 0;
  return n;
}

}  // namespace moeforge
