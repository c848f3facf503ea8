// defines: load_hf_checkpoint, load_hf_weights, save_hf_checkpoint, hub_tensor_name, copy_tokenizer,
//          HFModel
//
// Hugging Face checkpoints (config.json + safetensors, sharded or not) of the families
// qwen2_moe, mixtral, qwen2 and llama, read into and written from our model. Tensor names differ
// only in the `model.` prefix and in the routed experts, which the hub stores one by one
// (`mlp.experts.{e}.{gate,up,down}_proj.weight`; Mixtral: `block_sparse_moe.experts.{e}.{w1,w3,w2}`)
// and we store stacked. Loading checks every tensor and fails listing all that are missing,
// unexpected or mis-shaped: nothing is skipped silently.
#pragma once

#include "core/config/config.h"
#include "core/model/gpt_model.h"
#include "core/files/safetensors.h"
#include "moe/hf_config.h"  // config.json, read and written without LibTorch

#include <nlohmann/json.hpp>

#include <functional>
#include <vector>
#include <string>

namespace moeforge::moe {

struct HFModel {
  ModelConfig config;
  model::GPTModel model{nullptr};
};

// The hub's name of one of our non-expert tensors ("layers.3.mlp.gate.weight" ->
// "model.layers.3.mlp.gate.weight", Mixtral: "model.layers.3.block_sparse_moe.gate.weight").
std::string hub_tensor_name(const std::string& ours, ModelType type);

// Reads DIR/config.json and the weights (fp32 unless `dtype` says otherwise).
HFModel load_hf_checkpoint(const std::string& dir, torch::ScalarType dtype = torch::kFloat32);

// For a stacked expert weight that holds only some experts (a rank's, under expert parallelism):
// the global index of its first expert. Called only for stacked expert weights.
using FirstExpert = std::function<int64_t(const std::string& name)>;

// For a parameter that holds a part of each tensor (a tensor-parallel rank's): that part of
// `whole`, the parameter's tensor as one process holds it (this rank's experts of an expert weight).
using TensorPart = std::function<torch::Tensor(const std::string& name, const torch::Tensor& whole)>;

// Copies the weights of DIR into the materialised parameters of `model`, whose config must be the
// checkpoint's model (the caller compares them): parameters without elements (another pipeline
// stage's) are skipped, stacked expert weights get their experts from `first_expert` on (all from 0
// when it is empty), and with `part` each parameter gets its part of the tensor. Every tensor of the checkpoint is checked against the whole model first, by
// name and shape from the file headers: anything missing, unexpected or mis-shaped is a UserError
// listing all of them. Only the tensors copied are read.
void load_hf_weights(const std::string& dir, model::GPTModelImpl& model, const FirstExpert& first_expert = {},
                     const TensorPart& part = {});

// The tokenizer beside a checkpoint, as the hub lays it out: `tokenizer_json` copied as
// DIR/tokenizer.json, with the tokenizer_config.json and special_tokens_map.json beside it when
// present. Nothing for "" or "byte" (moeforge's byte-level tokenizer has no file).
void copy_tokenizer(const std::string& tokenizer_json, const std::string& dir);

// Writes DIR/config.json and the safetensors files in the hub layout `transformers` loads.
void save_hf_checkpoint(const model::GPTModelImpl& model, const std::string& dir);
// The same from the model's parameters by our names (all experts present, e.g. gathered from
// the expert-parallel ranks).
void save_hf_checkpoint(const ModelConfig& config, const NamedTensors& params, const std::string& dir);

}  // namespace moeforge::moe
