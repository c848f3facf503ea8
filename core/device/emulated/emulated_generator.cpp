#include "core/device/emulated/emulated_generator.h"

#include "core/device/emulated/emulated_runtime.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GeneratorImpl.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <vector>

namespace moeforge::emulated {
namespace {

class Generator final : public c10::GeneratorImpl {
 public:
  Generator(c10::DeviceIndex index, at::Generator cpu)
      : c10::GeneratorImpl(c10::Device(c10::DeviceType::PrivateUse1, index),
                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1)),
        cpu_(std::move(cpu)) {}

  const at::Generator& cpu() const { return cpu_; }

  void set_current_seed(uint64_t seed) override { cpu_.set_current_seed(seed); }
  void set_offset(uint64_t offset) override { cpu_.set_offset(offset); }
  uint64_t get_offset() const override { return cpu_.get_offset(); }
  uint64_t current_seed() const override { return cpu_.current_seed(); }
  uint64_t seed() override { return cpu_.seed(); }
  void set_state(const c10::TensorImpl& state) override { cpu_.unsafeGetGeneratorImpl()->set_state(state); }
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override { return cpu_.unsafeGetGeneratorImpl()->get_state(); }

 private:
  Generator* clone_impl() const override { return new Generator(device_.index(), cpu_.clone()); }

  at::Generator cpu_;
};

at::Generator make(c10::DeviceIndex index) {
  return at::make_generator<Generator>(index, at::detail::createCPUGenerator());
}

}  // namespace

const at::Generator& default_generator(c10::DeviceIndex index) {
  static std::once_flag once;
  static std::vector<at::Generator> generators;
  const c10::DeviceIndex device = checked_index(index);
  std::call_once(once, [] {
    for (c10::DeviceIndex i = 0; i < settings().devices; ++i) generators.push_back(make(i));
  });
  return generators[static_cast<size_t>(device)];
}

at::Generator new_generator(c10::DeviceIndex index) { return make(checked_index(index)); }

at::Generator cpu_generator_of(const at::Generator& generator) {
  const auto* emulated = dynamic_cast<const Generator*>(generator.unsafeGetGeneratorImpl());
  TORCH_CHECK(emulated != nullptr, "a generator of ", generator.device(), " is not an emulated device's");
  return emulated->cpu();
}

}  // namespace moeforge::emulated
