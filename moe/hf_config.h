// defines: model_config_from_hf, model_config_from_hf_text, read_hf_config, hf_config_from_model,
//          router_renormalizes, hf_export_differences
//
// A Hugging Face config.json (families qwen2_moe, mixtral, qwen2, llama) to and from our model
// section. Kept free of LibTorch so that the reader, which takes untrusted files, builds alone under
// libFuzzer (tests/fuzz/fuzz_hf_config.cpp). It reads as strictly as the YAML config loader: each
// key must hold its JSON type (an integer takes neither 128.7, "128" nor true), and the model read
// must pass the YAML config's own model rules (model_config_problems), reported under the hub's
// key names. Whatever the file holds, reading returns a model or throws UserError naming the file.
#pragma once

#include "core/config/config.h"

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace moeforge::moe {

// config.json -> the model section. UserError naming `path` and the key for an unsupported family
// or option, a missing key or one of the wrong type; one UserError listing every invalid value.
ModelConfig model_config_from_hf(const nlohmann::json& config_json, const std::string& path);
// The same from config.json's text (invalid JSON is a UserError too).
ModelConfig model_config_from_hf_text(std::string_view text, const std::string& path);
// DIR/config.json as our model section (UserError naming the file when absent or invalid).
ModelConfig read_hf_config(const std::string& dir);

// The model section as config.json; `dtype`: the weights' precision as the hub names it
// ("float32", "bfloat16").
nlohmann::json hf_config_from_model(const ModelConfig& config, const std::string& dtype);

// Whether the router's k weights sum to 1: Megatron's default (top k of the logits, softmax over
// those k) and pre-softmax routing with renormalisation route alike; the hub's norm_topk_prob.
bool router_renormalizes(const ModelConfig& config);
// What a Hugging Face reader of an exported `config` computes differently from moeforge, one
// line per setting (empty: the same model); save_hf_checkpoint warns once for each.
std::vector<std::string> hf_export_differences(const ModelConfig& config);

}  // namespace moeforge::moe
