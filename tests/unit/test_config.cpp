// Config loading: shipped configs, base files, overrides, round trip, and every error path.
#include "core/config/config_loader.h"
#include "core/config/config_schema.h"
#include "core/base/errors.h"
#include "test_util.h"

#include <catch2/catch.hpp>

#include <bit>
#include <chrono>
#include <filesystem>

using namespace moeforge;
using moeforge::test::TempDir;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;


TEST_CASE("shipped configs load with the values the issue specifies", "[config]") {
  const auto q = load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml")).config;
  CHECK(q.model.num_layers == 24);
  CHECK(q.model.hidden_size == 2048);
  CHECK(*q.model.num_experts == 60);
  CHECK(*q.model.moe_ffn_hidden_size == 1408);
  CHECK(q.model.moe_router_topk == 4);
  CHECK(q.model.moe_router_pre_softmax);
  CHECK_FALSE(q.model.moe_router_norm_topk_prob);
  CHECK(*q.model.moe_shared_expert_intermediate_size == 5632);
  CHECK(q.model.moe_shared_expert_gate);
  CHECK(q.training.global_batch_size == 512);
  CHECK(q.training.seq_length == 8192);
  CHECK(q.training.micro_batch_size == 1);
  CHECK(q.training.bf16);
  CHECK(q.parallel.pipeline_model_parallel_size == 2);
  CHECK(q.parallel.expert_model_parallel_size == 4);
  CHECK(*q.parallel.world_size == 8);

  const auto f = load_config(test::source_path("configs/flagperf-qwen1.5-moe.yaml")).config;
  CHECK(*f.model.num_experts == 8);
  CHECK(f.model.moe_router_topk == 2);
  CHECK_FALSE(f.model.moe_router_pre_softmax);
  CHECK(f.model.moe_aux_loss_coeff == 0.01);
  CHECK(f.training.lr == 1e-5);
  CHECK(f.training.min_lr == 1e-6);
  CHECK(f.model.init_method_std == 0.008);
  CHECK(f.data.split == "99,1,0");

  const auto t = load_config(test::source_path("configs/tiny.yaml")).config;
  CHECK(*t.model.num_experts == 60);
  CHECK(t.model.moe_router_topk == 4);
  CHECK(t.model.moe_shared_expert_intermediate_size.has_value());
}

TEST_CASE("derived values are filled in and marked", "[config]") {
  TempDir dir;
  const auto loaded = load_config(dir.file("c.yaml", test::kMinimalModel));
  const auto& m = loaded.config.model;
  CHECK(*m.num_query_groups == 4);
  CHECK(*m.kv_channels == 16);
  CHECK(*m.ffn_hidden_size == 256);
  CHECK(*m.max_position_embeddings == 32);
  CHECK(*loaded.config.training.lr_decay_iters == 10);
  CHECK(loaded.config.logging.run_dir == "runs/c");
  CHECK(loaded.origin.at("model.kv_channels") == "derived");
  CHECK(loaded.origin.at("training.adam_beta1") == "default");
  CHECK_THAT(loaded.origin.at("model.hidden_size"), Contains("c.yaml:4"));
}

TEST_CASE("a base config is extended and --set overrides any key", "[config]") {
  TempDir dir;
  dir.file("base.yaml", test::kMinimalModel);
  const auto child = dir.file("child.yaml", "base: base.yaml\nmodel:\n  hidden_size: 128\n");
  auto loaded = load_config(child, {"training.lr=3e-4", "model.moe_layer_freq=[1,0,1,0]", "data.data_path=a b"});
  CHECK(loaded.config.model.hidden_size == 128);
  CHECK(loaded.config.model.num_layers == 4);  // from the base
  CHECK(loaded.config.training.lr == 3e-4);
  CHECK(loaded.config.model.moe_layer_freq.pattern == std::vector<int64_t>{1, 0, 1, 0});
  CHECK(loaded.config.model.num_moe_layers() == 2);
  CHECK(loaded.config.data.data_path == std::vector<std::string>{"a b"});
  CHECK_THAT(loaded.origin.at("model.hidden_size"), Contains("child.yaml:3"));
  CHECK_THAT(loaded.origin.at("model.num_layers"), Contains("base.yaml"));
  CHECK(loaded.origin.at("training.lr") == "--set training.lr=3e-4");
}

TEST_CASE("the resolved YAML loads back to the same config", "[config]") {
  TempDir dir;
  for (const char* name : {"configs/qwen1.5-moe-a2.7b.yaml", "configs/flagperf-qwen1.5-moe.yaml", "configs/tiny.yaml"}) {
    const auto original = load_config(test::source_path(name));
    const auto path = write_resolved_config(original.config, dir.path());
    const auto again = load_config(path.string());
    for (const auto& f : config_fields()) {
      INFO(name << " " << f.name());
      CHECK(format_field_value(f, again.config) == format_field_value(f, original.config));
    }
  }
}

TEST_CASE("config numbers print as the shortest text that reads back to the same double", "[config]") {
  // Expected: Python's repr() of each double (the shortest round-trip text), less its `.0`.
  const std::vector<std::pair<double, std::string>> cases = {
      {0.1, "0.1"},         {0.1 + 0.2, "0.30000000000000004"}, {1.0 / 3, "0.3333333333333333"},
      {3e-4, "0.0003"},     {1e-8, "1e-08"},                    {2.5e-7, "2.5e-07"},
      {1e20, "1e+20"},      {5e-324, "5e-324"},                 {1.7976931348623157e308, "1.7976931348623157e+308"},
      {2.0, "2"},           {-0.0, "-0"}};
  const ConfigField* lr = find_config_field("training", "lr");
  REQUIRE(lr);
  for (const auto& [value, text] : cases) {
    INFO(text);
    ExperimentConfig c;
    c.training.lr = value;
    CHECK(format_field_value(*lr, c) == text);
    // The YAML written into run directories and checkpoints reads back to the identical bits.
    ExperimentConfig again;
    lr->assign(again, YAML::Load(resolved_config_yaml(c))["training"]["lr"]);
    CHECK(std::bit_cast<uint64_t>(again.training.lr) == std::bit_cast<uint64_t>(value));
  }
  // Through the loader: the table and the resolved config.yaml, defaults included.
  TempDir dir;
  const auto loaded = load_config(test::source_path("configs/tiny.yaml"), {"training.lr=0.1"});
  const std::string table = resolved_config_table(loaded);
  CHECK_THAT(table, Contains(" 0.1 ") && Contains(" 1e-06 ") && Contains(" 0.9 "));
  CHECK_THAT(table, !Contains("0.10000000000000001") && !Contains("9.9999999999999995e-07") &&
                        !Contains("0.90000000000000002"));
  const auto again = load_config(write_resolved_config(loaded.config, dir.path()).string());
  CHECK(again.config.training.lr == 0.1);
  CHECK(again.config.training.adam_beta1 == 0.9);
  CHECK(again.config.model.norm_epsilon == loaded.config.model.norm_epsilon);
}

TEST_CASE("the resolved-config table lists every key with its origin", "[config]") {
  const auto loaded = load_config(test::source_path("configs/tiny.yaml"));
  const std::string table = resolved_config_table(loaded);
  for (const auto& f : config_fields()) CHECK_THAT(table, Contains(f.name()));
  CHECK_THAT(table, Contains("configs/tiny.yaml:"));
  CHECK_THAT(table, Contains("derived"));
}

TEST_CASE("unknown keys and sections name the closest valid key", "[config][errors]") {
  TempDir dir;
  auto msg = test::user_error([&] { load_config(dir.file("a.yaml", std::string(test::kMinimalModel) + "  num_expert: 4\n")); });
  CHECK_THAT(msg, Contains("a.yaml:15") && Contains("unknown key `training.num_expert`") && Contains("model.num_experts"));

  msg = test::user_error([&] {
    load_config(dir.file("b.yaml", std::string(test::kMinimalModel) + "parallel:\n  num_layers: 4\n"));
  });
  CHECK_THAT(msg, Contains("`num_layers` belongs in section `model`"));

  msg = test::user_error([&] { load_config(dir.file("c.yaml", std::string(test::kMinimalModel) + "trainig:\n  lr: 1\n")); });
  CHECK_THAT(msg, Contains("unknown section `trainig`") && Contains("Did you mean `training`?"));

  msg = test::user_error([&] { load_config(dir.file("d.yaml", test::kMinimalModel), {"model.hiden_size=3"}); });
  CHECK_THAT(msg, Contains("--set model.hiden_size=3") && Contains("model.hidden_size"));

  msg = test::user_error([&] { load_config(dir.file("e.yaml", test::kMinimalModel), {"lr=3"}); });
  CHECK_THAT(msg, Contains("expected section.key=value"));
}

TEST_CASE("wrong types name the file, the line and the expected type", "[config][errors]") {
  TempDir dir;
  std::string text = test::kMinimalModel;
  text.replace(text.find("hidden_size: 64"), 15, "hidden_size: big");
  auto msg = test::user_error([&] { load_config(dir.file("t.yaml", text)); });
  CHECK_THAT(msg, Contains("t.yaml:4") && Contains("model.hidden_size") && Contains("expected an integer, got 'big'"));

  msg = test::user_error([&] { load_config(dir.file("u.yaml", test::kMinimalModel), {"training.lr_decay_style=cosin"}); });
  CHECK_THAT(msg, Contains("one of {constant, linear, cosine}") && Contains("'cosin'"));

  msg = test::user_error([&] { load_config(dir.file("v.yaml", test::kMinimalModel), {"training.bf16=maybe"}); });
  CHECK_THAT(msg, Contains("expected true or false"));

  msg = test::user_error([&] { load_config(dir.file("w.yaml", test::kMinimalModel), {"model.num_layers=[1, 2]"}); });
  CHECK_THAT(msg, Contains("expected an integer, got a list"));
}

TEST_CASE("missing required values are all listed", "[config][errors]") {
  TempDir dir;
  const auto msg = test::user_error([&] { load_config(dir.file("m.yaml", "model:\n  num_layers: 2\n")); });
  CHECK_THAT(msg, Contains("missing required values") && Contains("model.hidden_size") &&
                      Contains("model.num_attention_heads") && Contains("training.seq_length") &&
                      Contains("training.lr"));
  const auto null_msg = test::user_error([&] { load_config(dir.file("n.yaml", test::kMinimalModel), {"model.hidden_size=null"}); });
  CHECK_THAT(null_msg, Contains("`model.hidden_size` is required and cannot be null"));
}

TEST_CASE("file-level errors: missing file, bad YAML, cyclic base, wrong shapes", "[config][errors]") {
  TempDir dir;
  CHECK_THAT(test::user_error([&] { load_config((dir.path() / "nope.yaml").string()); }),
             Contains("config file not found") && Contains("nope.yaml"));
  CHECK_THAT(test::user_error([&] { load_config(dir.file("s.yaml", "model:\n  hidden_size: [1, 2\n")); }),
             Contains("s.yaml:") && Contains("YAML syntax error"));
  dir.file("x.yaml", "base: y.yaml\n");
  CHECK_THAT(test::user_error([&] { load_config(dir.file("y.yaml", "base: x.yaml\n")); }), Contains("cyclic"));
  CHECK_THAT(test::user_error([&] { load_config(dir.file("z.yaml", "base: missing.yaml\n")); }),
             Contains("missing.yaml") && Contains("the `base:` of"));
  // A name longer than the file system allows (found by fuzz_yaml_config): an error, not a crash.
  CHECK_THAT(test::user_error([&] { load_config(dir.file("long.yaml", "base: " + std::string(300, 'b') + "/c.yaml\n")); }),
             Contains("cannot resolve config path") && Contains("the `base:` of") && Contains("long.yaml"));
  CHECK_THAT(test::user_error([&] { load_config(dir.file("l.yaml", "- 1\n- 2\n")); }), Contains("must be a mapping of sections"));
  CHECK_THAT(test::user_error([&] { load_config(dir.file("empty.yaml", "")); }), Contains("the config is empty"));
  CHECK_THAT(test::user_error([&] { load_config(dir.file("sec.yaml", "model: 3\n")); }), Contains("section `model` must be a mapping"));
}

TEST_CASE("a YAML alias that contains itself, or aliases that expand without bound, are refused before any walk",
          "[config][errors]") {
  // Both files are also in the fuzz corpus (tests/fuzz/corpus/yaml_config/regression-*.yaml).
  const fs::path corpus = fs::path(test::source_dir()) / "tests/fuzz/corpus/yaml_config";
  CHECK_THAT(test::user_error([&] { load_config((corpus / "regression-self-alias.yaml").string()); }),
             Contains("regression-self-alias.yaml:4: an alias refers to a list or mapping that contains it"));
  const auto start = std::chrono::steady_clock::now();
  CHECK_THAT(test::user_error([&] { load_config((corpus / "regression-billion-laughs.yaml").string()); }),
             Contains("expands to more than 100000 values through its aliases"));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  CHECK_THAT(test::user_error([&] {
               load_config((fs::path(test::source_dir()) / "configs/tiny.yaml").string(), {"training.trainable=&a [*a]"});
             }),
             Contains("--set training.trainable=&a [*a]:1: an alias refers"));
}

TEST_CASE("invalid values and relations are reported together", "[config][errors]") {
  TempDir dir;
  const auto path = dir.file("c.yaml", test::kMinimalModel);
  auto msg = test::user_error([&] {
    load_config(path, {"model.hidden_size=66", "model.moe_router_topk=9", "training.min_lr=1", "model.num_query_groups=3"});
  });
  CHECK_THAT(msg, Contains("4 problems") && Contains("hidden_size (66) is not divisible by model.num_attention_heads (4)") &&
                      Contains("moe_router_topk (9) must be between 1 and model.num_experts (8)") &&
                      Contains("min_lr (1) is above training.lr") &&
                      Contains("num_attention_heads (4) is not divisible by model.num_query_groups (3)"));
  // The fix the message offers is accepted: an explicit head size needs no divisibility.
  const auto explicit_head = load_config(path, {"model.hidden_size=66", "model.kv_channels=16"});
  CHECK(*explicit_head.config.model.kv_channels == 16);
  CHECK_THAT(test::user_error([&] { load_config(path, {"model.moe_layer_freq=[1, 0]"}); }),
             Contains("lists 2 layers but model.num_layers is 4"));
  CHECK_THAT(test::user_error([&] { load_config(path, {"model.moe_router_norm_topk_prob=true"}); }),
             Contains("moe_router_pre_softmax is false"));
  CHECK_THAT(test::user_error([&] { load_config(path, {"model.moe_shared_expert_gate=true"}); }),
             Contains("there is no shared expert"));
  // 2e8 minutes overflowed the steady clock's deadline: every collective timed out at once.
  CHECK_THAT(test::user_error([&] { load_config(path, {"parallel.distributed_timeout_minutes=2e8"}); }),
             Contains("distributed_timeout_minutes is 2") && Contains("above the largest supported, 10080"));
  CHECK(load_config(path, {"parallel.distributed_timeout_minutes=10080"}).config.parallel.distributed_timeout_minutes == 10080);
  CHECK_THAT(test::user_error([&] { load_config(path, {"checkpoint.save_timeout_minutes=2e8"}); }),
             Contains("checkpoint.save_timeout_minutes is 2") && Contains("above the largest supported, 10080"));
  CHECK_THAT(test::user_error([&] { load_config(path, {"checkpoint.save_timeout_minutes=0"}); }),
             Contains("checkpoint.save_timeout_minutes must be positive"));
  CHECK_THAT(test::user_error([&] { load_config(path, {"training.seq_length=64", "model.max_position_embeddings=32"}); }),
             Contains("max_position_embeddings (32) is shorter than training.seq_length (64)"));
  CHECK_THAT(test::user_error([&] { load_config(path, {"training.lr_warmup_iters=20"}); }),
             Contains("lr_warmup_iters (20) exceeds training.lr_decay_iters (10)"));
  // Samples beyond 2^53 (a typo): the schedule's and the loader's arithmetic would overflow.
  CHECK_THAT(test::user_error([&] { load_config(path, {"training.global_batch_size=1073741824", "training.lr_decay_iters=8388609"}); }),
             Contains("training.global_batch_size (1073741824) x training.lr_decay_iters (8388609) is above 2^53 samples"));
  CHECK_NOTHROW(load_config(path, {"training.global_batch_size=1073741824", "training.train_iters=8388608"}));
  // Floating settings must be finite and representable in fp32, where they are used.
  const auto fp32 = test::user_error([&] {
    load_config(path, {"training.lr=.inf", "training.min_lr=0", "training.adam_eps=1e-46", "training.weight_decay=1e39",
                       "model.moe_aux_loss_coeff=.nan"});
  });
  CHECK_THAT(fp32, Contains("4 problems") && Contains("training.lr is inf, beyond fp32's range") &&
                       Contains("training.adam_eps is 1e-46, which is 0 in fp32") &&
                       Contains("training.weight_decay is 1e+39, beyond fp32's range") &&
                       Contains("model.moe_aux_loss_coeff must be >= 0, got nan"));
  CHECK_NOTHROW(load_config(path, {"training.adam_eps=1e-30", "training.weight_decay=0"}));
}
