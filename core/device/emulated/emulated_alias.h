// defines: AliasTable, empty_strided_on
//
// How the emulator runs a kernel: an emulated tensor's bytes are host memory, so a CPU tensor over
// the same bytes (same sizes, strides and offset) lets the CPU kernel work on it in place, no copy.
// An AliasTable makes those CPU aliases for one op call and maps the kernel's results back.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>

#include <optional>
#include <vector>

namespace moeforge::emulated {

// An emulated tensor of `sizes` and `strides` on device `index`, from the emulated allocator.
at::Tensor empty_strided_on(c10::IntArrayRef sizes, c10::IntArrayRef strides, c10::ScalarType dtype,
                            c10::DeviceIndex index);

class AliasTable {
 public:
  // A CPU tensor over `t`'s bytes when `t` is an emulated tensor, else `t`. Every device storage
  // gets one CPU storage and every device tensor one alias, so the CPU kernel's overlap and
  // identity checks see the aliasing the device tensors have.
  at::Tensor to_cpu(const at::Tensor& t);
  c10::Storage to_cpu(const c10::Storage& storage);

  // After the kernel ran: what it did to the aliases' metadata (resized an out= argument, restrided
  // one, set_ it to other memory) done to the device tensors, and bytes it moved to new CPU memory
  // copied into device memory.
  void write_back();

  // A tensor the kernel returned, as an emulated tensor: the device tensor it is the alias of, a
  // view of a device storage it lies in, or else a copy (same sizes and strides) of memory the
  // kernel allocated, on device().
  at::Tensor to_device(const at::Tensor& result) const;

  // The device of the first emulated tensor (or device argument, note_device) seen, the current
  // device if none; and the first other device seen, if any (a kernel must not mix them).
  c10::DeviceIndex device() const;
  std::optional<c10::DeviceIndex> other_device() const { return other_device_; }
  void note_device(c10::DeviceIndex index);

 private:
  struct StorageEntry {
    c10::Storage device;
    c10::Storage cpu;
    const void* device_data;  // the device bytes the CPU storage was made over
  };
  struct TensorEntry {
    at::Tensor device;
    at::Tensor cpu;
    c10::Storage cpu_storage;  // the alias's storage as made (the kernel may set_ it to another)
  };
  const StorageEntry* entry_of_cpu(const c10::Storage& cpu) const;

  // A few per op: linear search beats hashing.
  std::vector<StorageEntry> storages_;
  std::vector<TensorEntry> tensors_;
  std::optional<c10::DeviceIndex> device_;
  std::optional<c10::DeviceIndex> other_device_;
};

}  // namespace moeforge::emulated
