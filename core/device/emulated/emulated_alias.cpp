#include "core/device/emulated/emulated_alias.h"

#include "core/device/emulated/emulated_allocator.h"
#include "core/device/emulated/emulated_runtime.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <utility>

namespace moeforge::emulated {
namespace {

constexpr auto kType = c10::DeviceType::PrivateUse1;

bool is_emulated(const at::Tensor& t) { return t.defined() && t.device().type() == kType; }

// A tensor over `storage` with `like`'s dtype, sizes, strides and conjugate/negative bits.
at::Tensor tensor_over(c10::Storage storage, c10::DispatchKey key, const at::Tensor& like, int64_t storage_offset) {
  auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(key), like.dtype());
  t.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(), storage_offset);
  if (like.is_conj()) t._set_conj(true);
  if (like.is_neg()) t._set_neg(true);
  return t;
}

// The bytes `t`'s elements span, from its first one.
size_t span_bytes(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  return at::detail::computeStorageNbytes(t.sizes(), t.strides(), t.dtype().itemsize());
}

bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides() && a.storage_offset() == b.storage_offset();
}

}  // namespace

at::Tensor empty_strided_on(c10::IntArrayRef sizes, c10::IntArrayRef strides, c10::ScalarType dtype,
                            c10::DeviceIndex index) {
  const c10::DeviceGuard guard(c10::Device(kType, index));
  return at::detail::empty_strided_generic(sizes, strides, &allocator(), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           dtype);
}

c10::Storage AliasTable::to_cpu(const c10::Storage& storage) {
  if (!storage || storage.device_type() != kType) return storage;
  note_device(storage.device().index());
  for (const auto& e : storages_) {
    if (e.device.unsafeGetStorageImpl() == storage.unsafeGetStorageImpl()) return e.cpu;
  }
  void* data = storage.data_ptr().get();
  // Resizable (when the device storage is) through the CPU allocator: a CPU kernel may grow an out=
  // argument; write_back() then carries the new bytes to the device.
  c10::Storage cpu(c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(), storage.sym_nbytes(),
                                                         c10::DataPtr(data, c10::Device(c10::DeviceType::CPU)),
                                                         c10::GetCPUAllocator(), storage.resizable()));
  storages_.push_back({storage, cpu, data});
  return cpu;
}

at::Tensor AliasTable::to_cpu(const at::Tensor& t) {
  if (!is_emulated(t)) return t;
  TORCH_CHECK(t.layout() == c10::kStrided, "the emulated device runs strided tensors only, not ", t.layout());
  for (const auto& e : tensors_) {
    if (e.device.is_same(t)) return e.cpu;
  }
  c10::Storage storage = to_cpu(t.storage());
  at::Tensor cpu = tensor_over(storage, c10::DispatchKey::CPU, t, t.storage_offset());
  if (t.unsafeGetTensorImpl()->is_wrapped_number()) cpu.unsafeGetTensorImpl()->set_wrapped_number(true);
  tensors_.push_back({t, cpu, std::move(storage)});
  return cpu;
}

void AliasTable::write_back() {
  for (auto& e : storages_) {
    // The kernel grew the storage: the CPU allocator moved the bytes, and the device storage (shared
    // by every view of it, as the CPU storage was) grows to match.
    if (e.cpu.data_ptr().get() == e.device_data) continue;
    resize_storage_bytes(*e.device.unsafeGetStorageImpl(), e.cpu.nbytes());
    if (e.cpu.nbytes() > 0) std::memcpy(e.device.data_ptr().get(), e.cpu.data_ptr().get(), e.cpu.nbytes());
    e.device_data = e.device.data_ptr().get();
  }
  for (auto& e : tensors_) {
    c10::TensorImpl* device = e.device.unsafeGetTensorImpl();
    if (e.cpu.storage().unsafeGetStorageImpl() != e.cpu_storage.unsafeGetStorageImpl()) {
      // The kernel set_ the alias to other memory: one of this op's storages, or memory it allocated.
      const StorageEntry* known = entry_of_cpu(e.cpu.storage());
      if (known != nullptr) {
        device->set_storage_keep_dtype(known->device);
      } else {
        const c10::Storage& cpu = e.cpu.storage();
        const c10::DeviceGuard guard(e.device.device());
        c10::Storage fresh(c10::Storage::use_byte_size_t(), cpu.sym_nbytes(), &allocator(), /*resizable=*/true);
        if (cpu.nbytes() > 0) std::memcpy(fresh.data_ptr().get(), cpu.data_ptr().get(), cpu.nbytes());
        device->set_storage_keep_dtype(std::move(fresh));
      }
    }
    if (!same_layout(e.cpu, e.device)) {
      device->set_sizes_and_strides(e.cpu.sizes(), e.cpu.strides(), e.cpu.storage_offset());
    }
  }
}

at::Tensor AliasTable::to_device(const at::Tensor& result) const {
  if (!result.defined() || !result.is_cpu()) return result;
  for (const auto& e : tensors_) {
    if (e.cpu.is_same(result)) return e.device;
  }
  const size_t itemsize = result.dtype().itemsize();
  if (const StorageEntry* e = entry_of_cpu(result.storage())) {
    return tensor_over(e->device, c10::DispatchKey::PrivateUse1, result, result.storage_offset());
  }
  // A view the kernel made over a device storage's bytes without sharing its StorageImpl.
  const auto* data = static_cast<const char*>(result.storage().data_ptr().get());
  for (const auto& e : storages_) {
    const auto* base = static_cast<const char*>(e.device.data_ptr().get());
    if (data == nullptr || base == nullptr || data < base || data >= base + e.device.nbytes()) continue;
    const auto shift = static_cast<size_t>(data - base);
    const size_t offset = shift / itemsize + static_cast<size_t>(result.storage_offset());
    if (shift % itemsize == 0 && offset * itemsize + span_bytes(result) <= e.device.nbytes()) {
      return tensor_over(e.device, c10::DispatchKey::PrivateUse1, result, static_cast<int64_t>(offset));
    }
  }
  // Memory the kernel allocated: a device tensor of the same sizes and strides (strides matter, the
  // CPU flash-attention kernel's output is not contiguous, and a later kernel sees them).
  at::Tensor out = empty_strided_on(result.sizes(), result.strides(), result.scalar_type(), device());
  if (const size_t n = span_bytes(result); n > 0) std::memcpy(out.data_ptr(), result.const_data_ptr(), n);
  if (result.is_conj()) out._set_conj(true);
  if (result.is_neg()) out._set_neg(true);
  return out;
}

c10::DeviceIndex AliasTable::device() const { return device_.has_value() ? *device_ : current_device(); }

const AliasTable::StorageEntry* AliasTable::entry_of_cpu(const c10::Storage& cpu) const {
  for (const auto& e : storages_) {
    if (e.cpu.unsafeGetStorageImpl() == cpu.unsafeGetStorageImpl()) return &e;
  }
  return nullptr;
}

void AliasTable::note_device(c10::DeviceIndex index) {
  if (!device_.has_value()) {
    device_ = index;
  } else if (index != *device_ && !other_device_.has_value()) {
    other_device_ = index;
  }
}

}  // namespace moeforge::emulated
