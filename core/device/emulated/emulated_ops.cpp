// The emulated device's own kernels: the ops the CPU fallback cannot stand in for, because they make
// device tensors (empty), move bytes between devices (_copy_from), make views or change a tensor's
// metadata and memory (as_strided, view, resize_, set_), read a device value on the host
// (_local_scalar_dense) or tell the allocator about streams (record_stream); and the one LibTorch
// asks before moving a tensor's data into a parameter.
#include "core/device/emulated/emulated_alias.h"
#include "core/device/emulated/emulated_allocator.h"
#include "core/device/emulated/emulated_runtime.h"
#include "core/device/emulated/emulated_stream_check.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/_local_scalar_dense.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

namespace moeforge::emulated {
namespace {

constexpr auto kType = c10::DeviceType::PrivateUse1;

c10::DeviceIndex index_of(std::optional<c10::Device> device) {
  TORCH_CHECK(!device.has_value() || device->type() == kType, "expected an emulated device, got ", *device);
  return checked_index(device.has_value() && device->has_index() ? device->index() : -1);
}

void check_factory_options(std::optional<c10::Layout> layout, std::optional<bool> pin_memory) {
  TORCH_CHECK(layout.value_or(c10::kStrided) == c10::kStrided, "the emulated device makes strided tensors only, not ",
              *layout);
  TORCH_CHECK(!pin_memory.value_or(false), "Only dense CPU tensors can be pinned");
}

at::Tensor empty(c10::SymIntArrayRef size, std::optional<c10::ScalarType> dtype, std::optional<c10::Layout> layout,
                 std::optional<c10::Device> device, std::optional<bool> pin_memory,
                 std::optional<c10::MemoryFormat> memory_format) {
  check_factory_options(layout, pin_memory);
  const c10::DeviceGuard guard(c10::Device(kType, index_of(device)));
  return at::detail::empty_generic(C10_AS_INTARRAYREF_SLOW(size), &allocator(),
                                   c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::SymIntArrayRef size, c10::SymIntArrayRef stride, std::optional<c10::ScalarType> dtype,
                         std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                         std::optional<bool> pin_memory) {
  check_factory_options(layout, pin_memory);
  return empty_strided_on(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), c10::dtype_or_default(dtype),
                          index_of(device));
}

// A copy's accesses for the stream-order checker (Note [stream-order checker]), as CUDA orders a
// copy: issued on the source device's current stream when the source is on a device, that stream
// waiting for the destination device's before and the destination's for it after; and a copy that
// returns to the host with the data waits for its stream.
void note_copy(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  const bool from_device = self.device().type() == kType;
  const bool to_device = dst.device().type() == kType;
  const c10::DeviceIndex device = from_device ? self.device().index() : dst.device().index();
  const bool two_devices = from_device && to_device && self.device() != dst.device();
  if (two_devices) stream_check::stream_waited(current_stream(device), current_stream(dst.device().index()));
  stream_check::note_op("aten::_copy_from", device, {self}, {dst});
  if (two_devices) stream_check::stream_waited(current_stream(dst.device().index()), current_stream(device));
  if (!to_device && !non_blocking) stream_check::host_waited_copy(device);
}

// `self` into `dst`, either or both emulated, through CPU aliases; the CPU's copy_ converts dtypes
// and broadcasts.
at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  AliasTable table;
  // One table when both are on one device, so the CPU copy_ sees their overlap.
  AliasTable other;
  const bool one_device = self.device() == dst.device();
  at::Tensor dst_cpu = table.to_cpu(dst);
  dst_cpu.copy_((one_device ? table : other).to_cpu(self), non_blocking);
  if (stream_check::enabled()) note_copy(self, dst, non_blocking);
  if (self.device().type() == kType && dst.device().type() != kType && !non_blocking) host_synced();
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  dst.resize_(self.sizes());
  return copy_from(self, dst, false);
}

at::Tensor as_strided(const at::Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                      std::optional<c10::SymInt> storage_offset) {
  const auto offset = storage_offset.has_value() ? std::optional<int64_t>(storage_offset->expect_int()) : std::nullopt;
  return at::native::as_strided_tensorimpl(self, C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), offset);
}

at::Tensor view(const at::Tensor& self, c10::SymIntArrayRef size) {
  return at::native::view(self, C10_AS_INTARRAYREF_SLOW(size));
}

at::Tensor reshape_alias(const at::Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  return at::native::_reshape_alias(self, C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
}

// `self` given `sizes` and `strides` (contiguous when none), its storage grown through the allocator
// when they reach past it, as the CPU's resize grows a CPU storage.
void restride(c10::TensorImpl& self, c10::IntArrayRef sizes, std::optional<c10::IntArrayRef> strides) {
  const size_t itemsize = self.dtype().itemsize();
  size_t bytes = 0;
  if (strides.has_value()) {
    self.set_sizes_and_strides(sizes, *strides);
    bytes = at::detail::computeStorageNbytes(sizes, *strides, itemsize, static_cast<size_t>(self.storage_offset()));
  } else {
    self.set_sizes_contiguous(sizes);
    bytes = at::detail::computeStorageNbytesContiguous(sizes, itemsize, static_cast<size_t>(self.storage_offset()));
  }
  if (self.numel() > 0 && bytes > self.storage().nbytes()) {
    resize_storage_bytes(*self.storage().unsafeGetStorageImpl(), bytes);
  }
}

const at::Tensor& resize_(const at::Tensor& self, c10::SymIntArrayRef size,
                          std::optional<c10::MemoryFormat> memory_format) {
  c10::TensorImpl& impl = *self.unsafeGetTensorImpl();
  const c10::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(size);
  // Same sizes keep their strides, as on the CPU.
  if (impl.sizes() != sizes) restride(impl, sizes, std::nullopt);
  if (memory_format.has_value()) {
    TORCH_CHECK(*memory_format != c10::MemoryFormat::Preserve, "Unsupported memory format ", *memory_format);
    impl.empty_tensor_restride(*memory_format);
  }
  return self;
}

at::Tensor& set_storage_offset(at::Tensor& self, c10::Storage source, c10::SymInt storage_offset,
                               c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  TORCH_CHECK(source.device_type() == kType, "set_: expected an emulated storage, got one of ", source.device());
  TORCH_CHECK(source.device() == self.device(), "set_: the storage is on ", source.device(), ", the tensor on ",
              self.device());
  c10::TensorImpl& impl = *self.unsafeGetTensorImpl();
  if (impl.storage().unsafeGetStorageImpl() != source.unsafeGetStorageImpl()) {
    impl.set_storage_keep_dtype(std::move(source));
  }
  impl.set_storage_offset(storage_offset.expect_int());
  const auto strides = stride.empty() ? std::nullopt : std::optional(C10_AS_INTARRAYREF_SLOW(stride));
  restride(impl, C10_AS_INTARRAYREF_SLOW(size), strides);
  return self;
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage source) {
  const c10::SymInt elements(static_cast<int64_t>(source.nbytes() / self.dtype().itemsize()));
  return set_storage_offset(self, std::move(source), 0, c10::SymIntArrayRef(&elements, 1), {});
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  if (self.is_same(source)) return self;
  return set_storage_offset(self, source.storage(), source.storage_offset(), source.sym_sizes(), source.sym_strides());
}

at::Tensor& set_empty(at::Tensor& self) {
  const c10::DeviceGuard guard(self.device());
  c10::Storage empty_storage(c10::Storage::use_byte_size_t(), 0, &allocator(), /*resizable=*/true);
  const c10::SymInt zero(0);
  return set_storage_offset(self, std::move(empty_storage), 0, c10::SymIntArrayRef(&zero, 1), {});
}

at::Scalar local_scalar_dense(const at::Tensor& self) {
  AliasTable table;
  const at::Scalar value = at::_local_scalar_dense(table.to_cpu(self));
  host_synced();
  if (stream_check::enabled()) {
    // The host reads the value: CUDA waits for the stream first.
    stream_check::note_op("aten::_local_scalar_dense", self.device().index(), {self}, {});
    stream_check::host_waited_copy(self.device().index());
  }
  return value;
}

// Tensor::record_stream, as on CUDA: the allocator notes the stream on the tensor's block.
void record_stream(at::Tensor& self, c10::Stream stream) {
  TORCH_CHECK(stream.device() == self.device(), "record_stream: the stream is on ", stream.device(), ", the tensor on ",
              self.device());
  allocator().recordStream(self.storage().data_ptr(), stream);
}

// Whether set_data may move `from`'s data into `self` (Module::to moves parameters so). LibTorch's
// own answer lists the dense backends it knows, without PrivateUse1.
bool has_compatible_shallow_copy_type(const at::Tensor& self, const at::Tensor& from) {
  const auto dense = [](const at::Tensor& t) {
    return t.layout() == c10::kStrided && (t.is_cpu() || t.device().type() == kType);
  };
  return (dense(self) && dense(from)) || self.unsafeGetTensorImpl()->has_compatible_shallow_copy_type(from.key_set());
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", TORCH_FN(empty));
  m.impl("empty_strided", TORCH_FN(empty_strided));
  m.impl("_copy_from", TORCH_FN(copy_from));
  m.impl("_copy_from_and_resize", TORCH_FN(copy_from_and_resize));
  m.impl("as_strided", TORCH_FN(as_strided));
  m.impl("view", TORCH_FN(view));
  m.impl("_reshape_alias", TORCH_FN(reshape_alias));
  m.impl("resize_", TORCH_FN(resize_));
  m.impl("set_.source_Storage", TORCH_FN(set_storage));
  m.impl("set_.source_Storage_storage_offset", TORCH_FN(set_storage_offset));
  m.impl("set_.source_Tensor", TORCH_FN(set_tensor));
  m.impl("set_", TORCH_FN(set_empty));
  m.impl("_local_scalar_dense", TORCH_FN(local_scalar_dense));
  m.impl("record_stream", TORCH_FN(record_stream));
  m.impl("_has_compatible_shallow_copy_type", TORCH_FN(has_compatible_shallow_copy_type));
}

}  // namespace
}  // namespace moeforge::emulated
