// Scaled dot-product attention on the emulated device: the CPU's flash kernels, forward and
// backward, so at::scaled_dot_product_attention gives a CPU run's numbers bit for bit.
//
// at::scaled_dot_product_attention asks the device's _fused_sdp_choice_stub for a backend; a device
// without one takes the math path (the S x S scores in memory, and other numbers). The emulator
// answers with the CPU's own choice, except that where the CPU picks its flash kernel it answers
// `overrideable`, the slot LibTorch keeps for a backend's fused attention, whose two ops here run
// that CPU flash kernel on aliases (and autograd pairs them, by LibTorch's derivative formula).
#include "core/device/emulated/emulated_alias.h"
#include "core/device/emulated/emulated_stream_check.h"

#include <ATen/SDPBackend.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace moeforge::emulated {
namespace {

std::optional<at::Tensor> alias_of(const std::optional<at::Tensor>& t, AliasTable& table) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return table.to_cpu(*t);
}

int64_t choose_sdp_backend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                           std::optional<double> scale, bool enable_gqa) {
  AliasTable table;
  const int64_t cpu_choice =
      at::_fused_sdp_choice(table.to_cpu(query), table.to_cpu(key), table.to_cpu(value), alias_of(attn_mask, table),
                            dropout_p, is_causal, scale, enable_gqa);
  return cpu_choice == static_cast<int64_t>(at::SDPBackend::flash_attention)
             ? static_cast<int64_t>(at::SDPBackend::overrideable)
             : cpu_choice;
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::SymInt, c10::SymInt, at::Tensor,
                                 at::Tensor, at::Tensor>;

ForwardResult fused_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const std::optional<at::Tensor>& attn_bias, double dropout_p, bool is_causal,
                              bool return_debug_mask, std::optional<double> scale) {
  TORCH_CHECK(!return_debug_mask, "the emulated device's fused attention (the CPU flash kernel) has no debug mask");
  AliasTable table;
  const auto [output, logsumexp] = at::_scaled_dot_product_flash_attention_for_cpu(
      table.to_cpu(query), table.to_cpu(key), table.to_cpu(value), dropout_p, is_causal, alias_of(attn_bias, table),
      scale);
  // The outputs a variable-length or dropout kernel would fill: empty, as the backward ignores them.
  const auto none = [&query] { return at::empty({0}, query.options().dtype(at::kLong)); };
  ForwardResult result{table.to_device(output), table.to_device(logsumexp), none(), none(), query.sym_size(-2),
                       key.sym_size(-2), none(), none(), none()};
  if (stream_check::enabled()) {
    stream_check::note_op("aten::_scaled_dot_product_fused_attention_overrideable", query.device().index(),
                          {query, key, value, attn_bias.value_or(at::Tensor())},
                          {std::get<0>(result), std::get<1>(result)});
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& attn_bias, std::array<bool, 4> /*grad_input_mask*/, const at::Tensor& out,
    const at::Tensor& logsumexp, const at::Tensor& /*cum_seq_q*/, const at::Tensor& /*cum_seq_k*/,
    c10::SymInt /*max_q*/, c10::SymInt /*max_k*/, double dropout_p, bool is_causal, const at::Tensor& /*philox_seed*/,
    const at::Tensor& /*philox_offset*/, std::optional<double> scale) {
  AliasTable table;
  const auto [grad_query, grad_key, grad_value] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      table.to_cpu(grad_out), table.to_cpu(query), table.to_cpu(key), table.to_cpu(value), table.to_cpu(out),
      table.to_cpu(logsumexp), dropout_p, is_causal, alias_of(attn_bias, table), scale);
  // No gradient for the mask: the CPU flash kernel's backward computes none either.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads{
      table.to_device(grad_query), table.to_device(grad_key), table.to_device(grad_value), at::Tensor()};
  if (stream_check::enabled()) {
    stream_check::note_op("aten::_scaled_dot_product_fused_attention_overrideable_backward", query.device().index(),
                          {grad_out, query, key, value, attn_bias, out, logsumexp},
                          {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)});
  }
  return grads;
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("_fused_sdp_choice", TORCH_FN(choose_sdp_backend));
  m.impl("_scaled_dot_product_fused_attention_overrideable", TORCH_FN(fused_attention));
  m.impl("_scaled_dot_product_fused_attention_overrideable_backward", TORCH_FN(fused_attention_backward));
}

}  // namespace
}  // namespace moeforge::emulated

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &moeforge::emulated::choose_sdp_backend)
}  // namespace at::native
