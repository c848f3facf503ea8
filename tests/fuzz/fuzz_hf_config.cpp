// libFuzzer target for the Hugging Face config.json reader (moe/hf_config.cpp: JSON parsing, each
// key's type, the hub's own keys, and the model rules the YAML config is held to). Input: the
// file's bytes. Reading must either return a model section or throw UserError; anything else (a
// crash, a sanitizer report, another exception type) is a bug. A model it returns is then sized
// (parameter counts: an overflow there must be a UserError too) and written back as config.json,
// which must read as the same model.
#include "core/base/errors.h"
#include "core/flops/model_size.h"
#include "moe/hf_config.h"

#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  moeforge::ModelConfig config;
  try {
    config = moeforge::moe::model_config_from_hf_text(text, "fuzz/config.json");
    moeforge::count_parameters(config);
  } catch (const moeforge::UserError&) {
    return 0;
  }
  const auto again = moeforge::moe::model_config_from_hf(moeforge::moe::hf_config_from_model(config, "float32"), "again");
  if (again.num_layers != config.num_layers || again.hidden_size != config.hidden_size ||
      again.num_experts != config.num_experts || again.moe_layer_freq.pattern != config.moe_layer_freq.pattern ||
      again.kv_channels != config.kv_channels || again.moe_router_topk != config.moe_router_topk) {
    std::abort();
  }
  return 0;
}
