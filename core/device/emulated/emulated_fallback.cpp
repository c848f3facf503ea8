// The emulated device's kernel for every op without one of its own: the CPU kernel, run on CPU
// tensors that alias the emulated tensors' bytes (emulated_alias.h). Its numbers are therefore the
// CPU's, bit for bit. Ops whose composite kernels LibTorch runs for any backend (most functional
// and in-place ops delegate to their out= variant, views to as_strided) reach it as those parts.
#include "core/device/emulated/emulated_alias.h"
#include "core/device/emulated/emulated_generator.h"
#include "core/device/emulated/emulated_stream_check.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace moeforge::emulated {
namespace {

constexpr auto kType = c10::DeviceType::PrivateUse1;

// `value` with every emulated tensor (also in tensor lists and lists of optional tensors), storage,
// device and generator replaced by the CPU's.
c10::IValue to_cpu(const c10::IValue& value, AliasTable& table) {
  if (value.isTensor()) return table.to_cpu(value.toTensor());
  if (value.isTensorList()) {
    c10::List<at::Tensor> list;
    for (const at::Tensor& t : value.toTensorList()) list.push_back(table.to_cpu(t));
    return list;
  }
  if (value.isList()) {
    const c10::List<c10::IValue> list = value.toList();
    c10::impl::GenericList out(list.elementType());
    for (const c10::IValue& item : list) out.push_back(to_cpu(item, table));
    return out;
  }
  if (value.isStorage()) return table.to_cpu(value.toStorage());
  if (value.isDevice() && value.toDevice().type() == kType) {
    if (value.toDevice().has_index()) table.note_device(value.toDevice().index());
    return c10::Device(c10::DeviceType::CPU);
  }
  if (value.isGenerator() && value.toGenerator().device().type() == kType) {
    return cpu_generator_of(value.toGenerator());
  }
  return value;
}

// `value` (a result of the CPU kernel) with every tensor mapped back to the device.
c10::IValue to_device(const c10::IValue& value, const AliasTable& table) {
  if (value.isTensor()) return table.to_device(value.toTensor());
  if (value.isTensorList()) {
    c10::List<at::Tensor> list;
    for (const at::Tensor& t : value.toTensorList()) list.push_back(table.to_device(t));
    return list;
  }
  if (value.isList()) {
    const c10::List<c10::IValue> list = value.toList();
    c10::impl::GenericList out(list.elementType());
    for (const c10::IValue& item : list) out.push_back(to_device(item, table));
    return out;
  }
  return value;
}

// The argument that return `i` writes through (in-place and out= ops: `Tensor(a!)`), if any.
std::optional<size_t> written_argument(const c10::FunctionSchema& schema, size_t i) {
  const c10::AliasInfo* returned = schema.returns()[i].alias_info();
  if (returned == nullptr || !returned->isWrite()) return std::nullopt;
  for (size_t j = 0; j < schema.arguments().size(); ++j) {
    const c10::AliasInfo* argument = schema.arguments()[j].alias_info();
    if (argument != nullptr && argument->isWrite() && argument->beforeSets() == returned->beforeSets()) return j;
  }
  return std::nullopt;
}

// Whether an argument is written: `Tensor(a!)`, or a list of such (`Tensor(a!)[]`).
bool is_written(const c10::AliasInfo* info) {
  if (info == nullptr) return false;
  const auto& elements = info->containedTypes();
  return info->isWrite() || std::any_of(elements.begin(), elements.end(), [](const auto& e) { return is_written(&e); });
}

// `f` on every tensor in `value`: a tensor, a tensor list, a list of optional tensors.
template <typename F>
void for_each_tensor(const c10::IValue& value, const F& f) {
  if (value.isTensor()) {
    f(value.toTensor());
  } else if (value.isTensorList()) {
    for (const at::Tensor& t : value.toTensorList()) f(t);
  } else if (value.isList()) {
    for (const c10::IValue& item : value.toList()) for_each_tensor(item, f);
  }
}

// What the op read and wrote, from its schema, for the stream-order checker (Note [stream-order
// checker]). A `Tensor(a)` argument is only aliased by a view the op returns, and an inplace_view op
// changes metadata only: neither touches bytes.
void note_accesses(const c10::OperatorHandle& op, const std::vector<c10::IValue>& arguments,
                   const torch::jit::Stack& stack, c10::DeviceIndex device) {
  if (op.hasTag(at::Tag::inplace_view)) return;
  const c10::FunctionSchema& schema = op.schema();
  stream_check::OpAccesses accesses;
  for (size_t j = 0; j < arguments.size(); ++j) {
    const c10::AliasInfo* info = schema.arguments()[j].alias_info();
    if (is_written(info)) {
      for_each_tensor(arguments[j], [&](const at::Tensor& t) { accesses.write(t); });
    } else if (info == nullptr) {
      for_each_tensor(arguments[j], [&](const at::Tensor& t) { accesses.read(t); });
    }
  }
  const size_t n_returns = schema.returns().size();
  for (size_t i = 0; i < n_returns; ++i) {
    if (schema.returns()[i].alias_info() != nullptr) continue;  // an argument, or a view of one
    for_each_tensor(stack[stack.size() - n_returns + i], [&](const at::Tensor& t) { accesses.write(t); });
  }
  accesses.note(c10::toString(schema.operator_name()), device);
}

void run_on_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t n_arguments = schema.arguments().size();
  const auto arguments = static_cast<std::ptrdiff_t>(stack->size() - n_arguments);
  const std::vector<c10::IValue> originals(stack->begin() + arguments, stack->end());
  AliasTable table;
  for (auto it = stack->begin() + arguments; it != stack->end(); ++it) *it = to_cpu(*it, table);
  // As CUDA's generated kernels check (the CPU kernel would happily mix the aliases).
  if (const auto other = table.other_device()) {
    TORCH_CHECK(false, "Expected all tensors to be on the same device, but found at least two devices, emulated:",
                static_cast<int>(table.device()), " and emulated:", static_cast<int>(*other), "! (when running ",
                schema.operator_name(), ")");
  }

  op.callBoxed(stack);

  table.write_back();
  const size_t n_returns = schema.returns().size();
  const size_t returns = stack->size() - n_returns;
  for (size_t i = 0; i < n_returns; ++i) {
    c10::IValue& value = (*stack)[returns + i];
    const auto written = written_argument(schema, i);
    value = written.has_value() ? originals[*written] : to_device(value, table);
  }
  if (stream_check::enabled()) note_accesses(op, originals, *stack, table.device());
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&run_on_cpu>()); }

// The ops with both a CPU kernel and a composite one (native_functions.yaml): LibTorch prefers the
// composite to a fallback, and some composites compute differently, so these ask for the CPU kernel
// by name. CompositeExplicitAutograd: math_native_layer_norm, math_group_norm, math_addr and the rest.
// CompositeImplicitAutograd (silu_backward, mish_backward, native_channel_shuffle): for a backend
// without a kernel of its own the math kernel takes even the Autograd slot, so it runs before autograd
// and the backend (math_silu_backward's sigmoid * (1 + x * (1 - sigmoid)), not the CPU's silu
// backward: SwiGLU's gate gradients differ in the last bits); with a PrivateUse1 kernel the slot gets
// the autograd kernel the CPU has.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  for (const char* op : {"addr", "addr.out", "all.dims_out", "any.dims_out", "native_group_norm", "native_layer_norm",
                         "narrow_copy", "pixel_shuffle", "pixel_unshuffle", "_stack", "_stack.out", "linalg__powsum",
                         "silu_backward", "mish_backward", "native_channel_shuffle"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&run_on_cpu>());
  }
}

}  // namespace
}  // namespace moeforge::emulated
