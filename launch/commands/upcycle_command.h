// defines: UpcycleCommandOptions, run_upcycle, verify_upcycled
//
// `moeforge upcycle --from HF_DENSE_DIR --to OUT_DIR --config CONFIG [options]`: an MoE Hugging
// Face checkpoint (the config's model section: qwen2_moe or mixtral) built from a dense Qwen2 /
// Qwen1.5 / Llama checkpoint by moe/upcycle.h's methods; every non-MLP tensor carried over,
// every dense tensor accounted for, `upcycle.json` recording the method, seed and options.
// `--verify` checks the method's invariants on sample tokens (docs/upcycling.md).
#pragma once

#include "core/config/config.h"
#include "core/model/gpt_model.h"
#include "moe/upcycle.h"

#include <optional>
#include <string>
#include <vector>

namespace moeforge {

struct UpcycleCommandOptions {
  std::string from, to, config_path;
  std::vector<std::string> overrides;
  moe::UpcycleOptions upcycle;
  bool verify = false;
  bool overwrite = false;  // replace a non-empty --to directory
};
int run_upcycle(const UpcycleCommandOptions& options);

// Compares the upcycled model with the dense one and prints each statement with its measurement;
// returns false when an exact invariant of the method fails.
bool verify_upcycled(model::GPTModelImpl& dense, model::GPTModelImpl& moe, const ModelConfig& moe_config,
                     const moe::UpcycleOptions& options);

}  // namespace moeforge
