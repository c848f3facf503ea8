// libFuzzer target for the YAML config loader (core/config/config_loader.cpp: parsing, duplicate keys,
// `base` chains, --set overrides, schema types and validation). Input: the config file's bytes;
// an input whose first line is `#set section.key=value` also applies that override. Loading must
// either return a config or throw UserError; anything else (a crash, a sanitizer report, another
// exception type) is a bug.
#include "core/config/config_loader.h"
#include "core/base/errors.h"

#include <cstdio>
#include <string>
#include <unistd.h>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/dev/shm/moeforge-fuzz-" + std::to_string(::getpid()) + ".yaml";
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  std::vector<std::string> overrides;
  if (text.rfind("#set ", 0) == 0) overrides.push_back(text.substr(5, text.find('\n') - 5));
  for (const auto use : {moeforge::ConfigUse::training, moeforge::ConfigUse::model_only}) {
    try {
      moeforge::load_config(path, overrides, use);
    } catch (const moeforge::UserError&) {
    }
  }
  return 0;
}
