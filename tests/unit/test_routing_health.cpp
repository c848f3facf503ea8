// The routing-collapse detector (launch/train/routing_health.h) against hand-made load sequences
// whose answer is known in closed form: it fires on the kCollapseIterations-th collapsed iteration
// in a row of some layer after the start-up grace, exactly once, names the layers that got there,
// and a healthy iteration restarts a layer's count. Then end to end: a small run that collapses warns once, records it
// and its report names it, the same under expert parallelism; with the settings it names fixed,
// no warning.
#include "launch/train/metrics.h"
#include "launch/train/routing_health.h"
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fstream>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

const CollapseCriterion kEightExperts{8, 128};  // 128 slots per expert: idle experts count
constexpr int64_t kFirstCounted = kCollapseGraceIterations + 1;
const LayerLoad kEvenLoad{1.3, 0};
const LayerLoad kSkewedLoad{5.0, 0};

// Feeds iterations [first, last] with `loads_L`; returns what it reported.
std::vector<RoutingCollapse> feed_loads(RoutingHealth& h, int64_t first, int64_t last, const std::vector<LayerLoad>& loads_L) {
  std::vector<RoutingCollapse> fired;
  for (int64_t it = first; it <= last; ++it) {
    if (auto c = h.observe(it, loads_L)) fired.push_back(*c);
  }
  return fired;
}

}  // namespace

TEST_CASE("routing health: a layer collapsed from the start is reported on its 10th counted iteration, once",
          "[routing_health]") {
  REQUIRE(kCollapseIterations == 10);
  REQUIRE(kCollapseGraceIterations == 20);
  RoutingHealth h(kEightExperts);
  CHECK(feed_loads(h, 1, 29, {kEvenLoad, kSkewedLoad, kEvenLoad}).empty());  // 20 not counted, then 9
  const auto fired = feed_loads(h, 30, 80, {kEvenLoad, kSkewedLoad, kEvenLoad});
  REQUIRE(fired.size() == 1);
  const auto& c = fired[0];
  CHECK(c.iteration == 30);
  CHECK(c.first_iteration == kFirstCounted);
  CHECK(c.num_moe_layers == 3);
  CHECK(c.moe_layers == std::vector<int64_t>{1});
  REQUIRE(c.loads.size() == 1);
  CHECK(c.loads[0].max_over_mean == 5.0);
  // Once only: another layer collapsing later is not reported again.
  CHECK(feed_loads(h, 81, 120, {kSkewedLoad, kSkewedLoad, kSkewedLoad}).empty());
}

TEST_CASE("routing health: 4x the mean counts, just below does not", "[routing_health]") {
  RoutingHealth at(kEightExperts), below(kEightExperts);
  CHECK(feed_loads(at, kFirstCounted, kFirstCounted + 9, {{kCollapseMaxOverMean, 0}}).size() == 1);
  CHECK(feed_loads(below, 1, 200, {{std::nextafter(kCollapseMaxOverMean, 0.0), 0}}).empty());
}

TEST_CASE("routing health: a quarter of the experts idle counts where the batch gives each expert 16 slots",
          "[routing_health]") {
  // Every token on the same 4 of 8 experts under top-4: max/mean is E/K = 2, never 4; only the
  // idle experts show the collapse. A quarter of 8 is 2.
  RoutingHealth h(kEightExperts);
  const auto fired = feed_loads(h, 25, 40, {{2.0, 4}});
  REQUIRE(fired.size() == 1);
  CHECK(fired[0].iteration == 34);
  CHECK(fired[0].first_iteration == 25);
  CHECK(fired[0].loads[0].idle_experts == 4);
  RoutingHealth two(kEightExperts), one(kEightExperts);
  CHECK(feed_loads(two, kFirstCounted, kFirstCounted + 9, {{1.5, 2}}).size() == 1);
  CHECK(feed_loads(one, 1, 200, {{1.5, 1}}).empty());
  // Fewer slots per expert than that: experts are empty whatever the router does.
  RoutingHealth few({8, kIdleMinExpectedSlots - 1}), enough({8, kIdleMinExpectedSlots});
  CHECK(feed_loads(few, 1, 200, {{2.0, 6}}).empty());
  CHECK(feed_loads(enough, kFirstCounted, kFirstCounted + 9, {{2.0, 6}}).size() == 1);
}

TEST_CASE("routing health: a healthy iteration restarts the count", "[routing_health]") {
  RoutingHealth h(kEightExperts);
  CHECK(feed_loads(h, 1, 29, {kSkewedLoad}).empty());
  CHECK(feed_loads(h, 30, 30, {kEvenLoad}).empty());
  CHECK(feed_loads(h, 31, 39, {kSkewedLoad}).empty());
  const auto fired = feed_loads(h, 40, 40, {kSkewedLoad});
  REQUIRE(fired.size() == 1);
  CHECK(fired[0].first_iteration == 31);
  CHECK(fired[0].iteration == 40);
}

TEST_CASE("routing health: every layer that reaches 10 at once is named, a shorter streak is not", "[routing_health]") {
  RoutingHealth h(kEightExperts);
  CHECK(feed_loads(h, 1, 23, {kSkewedLoad, kEvenLoad, kSkewedLoad, kEvenLoad}).empty());
  const auto fired = feed_loads(h, 24, 30, {kSkewedLoad, kSkewedLoad, kSkewedLoad, {1.0, 3}});
  REQUIRE(fired.size() == 1);
  CHECK(fired[0].moe_layers == std::vector<int64_t>{0, 2});
  CHECK(fired[0].iteration == 30);
}

TEST_CASE("routing health: a resumed run goes on counting from its metrics.jsonl and does not warn twice",
          "[routing_health]") {
  TempDir dir;
  auto write = [&](const std::string& name, int64_t iterations, bool with_idle) {
    std::ofstream out(dir.path() / name);
    for (int64_t it = 1; it <= iterations; ++it) {
      json line = {{metric::kIteration, it}, {metric::kExpertLoadPerLayer, {1.1, 2.0}}};
      if (with_idle) line[metric::kExpertIdlePerLayer] = {0, 3};
      out << line.dump() << "\n";
    }
    return dir.path() / name;
  };
  SECTION("6 counted collapsed iterations before the checkpoint: the 4th after it fires") {
    RoutingHealth h(kEightExperts);
    h.replay(write("six.jsonl", 26, true));
    CHECK(feed_loads(h, 27, 29, {kEvenLoad, {2.0, 3}}).empty());
    const auto fired = feed_loads(h, 30, 30, {kEvenLoad, {2.0, 3}});
    REQUIRE(fired.size() == 1);
    CHECK(fired[0].first_iteration == kFirstCounted);
    CHECK(fired[0].moe_layers == std::vector<int64_t>{1});
  }
  SECTION("the killed run already warned: the resumed one does not") {
    RoutingHealth h(kEightExperts);
    h.replay(write("warned.jsonl", 32, true));
    CHECK(feed_loads(h, 33, 80, {kSkewedLoad, kSkewedLoad}).empty());
  }
  SECTION("lines from before idle counts were recorded read as none idle") {
    RoutingHealth h(kEightExperts);
    h.replay(write("old.jsonl", 32, false));
    CHECK(feed_loads(h, 33, 41, {kEvenLoad, kSkewedLoad}).empty());
    CHECK(feed_loads(h, 42, 42, {kEvenLoad, kSkewedLoad}).size() == 1);
  }
}

TEST_CASE("routing health: the warning names the layers, the iterations and the run's settings", "[routing_health]") {
  ExperimentConfig c;
  c.model.num_layers = 4;
  c.model.hidden_size = 256;
  c.model.num_experts = 16;
  c.model.moe_router_topk = 2;
  c.model.moe_layer_freq.every = 2;  // MoE layers 0, 1 are decoder layers 0, 2
  c.model.init_method_std = 0.02;
  c.model.moe_aux_loss_coeff = 0.001;
  c.training.lr = 3e-3;
  c.training.lr_warmup_iters = 4;
  c.training.global_batch_size = 8;
  c.training.seq_length = 64;
  const auto criterion = CollapseCriterion::of(c);
  CHECK(criterion.num_experts == 16);
  CHECK(criterion.expected_slots_per_expert == 8.0 * 64 * 2 / 16);
  const RoutingCollapse collapse{23, 32, 2, {1}, {{7.5, 5}}};
  const auto message = routing_collapse_message(collapse, c);
  CHECK_THAT(message, Contains("MoE layer 1 (of 2), decoder layer 2") && Contains("iterations 23-32") &&
                          Contains("busiest expert 7.50x the mean, 5 of 16 experts idle") &&
                          Contains("8x = every token on the same 2 experts") && Contains("moe_aux_loss_coeff 0.001") &&
                          Contains("init_method_std 0.02 at hidden_size 256") && Contains("1/sqrt(hidden_size) = 0.062") &&
                          Contains("training.lr 0.003 with 4 warm-up iterations"));
  const auto j = routing_collapse_json(collapse, c.model);
  CHECK(j == json{{"first_iteration", 23}, {"iteration", 32}, {"moe_layers", {1}}, {"layers", {2}}, {"num_moe_layers", 2},
                  {"max_over_mean", {7.5}}, {"idle_experts", {5}}, {"num_experts", 16}});
}

namespace {

// The criterion of docs/training.md, written out for the fixture's batch (8 x 32 tokens, top-2 of
// 8 experts: 64 slots per expert, so idle experts count, from 2 of 8).
bool collapsed_in(const json& line, size_t layer) {
  return line["expert_load_per_layer"][layer].get<double>() >= 4.0 || line["expert_idle_per_layer"][layer].get<int64_t>() >= 2;
}

size_t count_of(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("a run whose routing collapses warns once and its report names the layers, under EP too, and the fixed "
          "settings do not warn",
          "[routing_health][train]") {
  TempDir dir;
  const auto config = write_config(dir);
  // Top-2 of 8 experts (E/K = 4, so the ratio can reach 4x), per-layer balancing. Without a
  // balancing loss and with Megatron's init 0.02 at hidden size 64, a layer's routing collapses
  // within the first iterations; a strong balancing loss and an init of 1/sqrt(64) keep it even.
  const std::string routing = " --set model.moe_router_topk=2 --set model.moe_router_load_balancing_type=aux_loss "
                              "--set training.train_iters=40 --set training.eval_iters=0";
  const std::string collapsing = routing + " --set model.moe_aux_loss_coeff=0";
  const auto run = dir.path() / "collapsed";
  const auto out = train(config, collapsing + " --set logging.run_dir=" + run.string());
  const auto m = read_metrics(run / "metrics.jsonl");
  REQUIRE(m.size() == 40);

  // The event sits on one line, and agrees with the loads every line recorded: the named layers
  // were collapsed on each of its 10 iterations and not on a counted one before, and no layer had
  // 10 counted collapsed iterations in a row earlier (iterations 1-20 are not counted).
  std::vector<json> events;
  for (const auto& line : m) {
    if (line.contains("routing_collapse")) events.push_back(line["routing_collapse"]);
  }
  REQUIRE(events.size() == 1);
  const auto& e = events[0];
  const int64_t first = e["first_iteration"].get<int64_t>(), warned = e["iteration"].get<int64_t>();
  CHECK(warned - first + 1 == 10);
  REQUIRE(!e["moe_layers"].empty());
  for (const auto& layer : e["moe_layers"]) {
    const auto l = layer.get<size_t>();
    for (int64_t it = first; it <= warned; ++it) CHECK(collapsed_in(m[static_cast<size_t>(it - 1)], l));
    if (first > 21) CHECK_FALSE(collapsed_in(m[static_cast<size_t>(first - 2)], l));
  }
  for (size_t l = 0; l < 2; ++l) {
    int64_t streak = 0;
    for (int64_t it = 21; it < warned; ++it) {
      streak = collapsed_in(m[static_cast<size_t>(it - 1)], l) ? streak + 1 : 0;
      CHECK(streak < 10);
    }
  }
  CHECK(e["num_moe_layers"] == 2);
  CHECK(e["layers"] == e["moe_layers"]);  // every layer of the fixture is a MoE layer

  // The log: once, naming the layers, the iterations and the settings with this run's values.
  CHECK(count_of(out, "routing collapse:") == 1);
  const auto layers = e["moe_layers"].get<std::vector<int64_t>>();
  CHECK_THAT(out, Contains(fmt::format("{} {} (of 2)", layers.size() > 1 ? "MoE layers" : "MoE layer", fmt::join(layers, ", "))) &&
                      Contains(fmt::format("iterations {}-{}", first, warned)) &&
                      Contains("model.moe_aux_loss_coeff 0 with moe_router_load_balancing_type aux_loss") &&
                      Contains("model.init_method_std 0.02 at hidden_size 64"));

  // The report: a banner and a section naming the layers and the iterations.
  const auto r = run_command(kBin + " report " + run.string());
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto md = slurp((run / "report" / "report.md").string());
  CHECK_THAT(md, Contains("## Routing collapse") &&
                     Contains(fmt::format("collapsed from iteration {} on (warned at iteration {})", first, warned)));
  CHECK_THAT(slurp((run / "report" / "report.html").string()), Contains("Routing collapse: MoE layer"));
  const auto rep = json::parse(std::ifstream(run / "report" / "report.json"));
  REQUIRE(rep["routing_collapse"].size() == 1);
  CHECK(rep["routing_collapse"][0]["moe_layers"] == e["moe_layers"]);
  CHECK(rep["routing_collapse"][0]["last_iteration"].get<int64_t>() >= warned);

  SECTION("expert parallel (EP 2): the loads are global, the same warning at the same iteration") {
    const auto ep = dir.path() / "ep2";
    const auto r2 = run_command(kMpirun + " -np 2 " + kBin + " train " + config + collapsing +
                                " --set parallel.expert_model_parallel_size=2 --set logging.run_dir=" + ep.string());
    INFO(r2.output);
    REQUIRE(r2.exit_code == 0);
    CHECK(count_of(r2.output, "routing collapse:") == 1);  // rank 0 alone warns
    const auto m2 = read_metrics(ep / "metrics.jsonl");
    REQUIRE(m2.size() == m.size());
    for (size_t i = 0; i < m.size(); ++i) {
      INFO("iteration " << i + 1);
      CHECK(m2[i]["expert_idle_per_layer"] == m[i]["expert_idle_per_layer"]);
      CHECK(m2[i].value("routing_collapse", json()) == m[i].value("routing_collapse", json()));
    }
  }
  SECTION("the settings the warning names, fixed: no warning, no event, no section") {
    const auto fixed = dir.path() / "fixed";
    const auto out2 = train(config, routing + " --set model.moe_aux_loss_coeff=0.2 --set model.init_method_std=0.125 "
                                              "--set logging.run_dir=" + fixed.string());
    CHECK_THAT(out2, !Contains("routing collapse"));
    for (const auto& line : read_metrics(fixed / "metrics.jsonl")) {
      INFO("iteration " << line["iteration"]);
      CHECK_FALSE(line.contains("routing_collapse"));
      CHECK(line["expert_load_max_over_mean"].get<double>() < 4.0);
    }
    const auto r3 = run_command(kBin + " report " + fixed.string());
    REQUIRE(r3.exit_code == 0);
    CHECK_THAT(slurp((fixed / "report" / "report.md").string()), !Contains("Routing collapse"));
    CHECK(json::parse(std::ifstream(fixed / "report" / "report.json"))["routing_collapse"].empty());
  }
}

TEST_CASE("the quickstart with Megatron's init and a weak balancing loss collapses in every layer, and is told so",
          "[routing_health][train][quickstart]") {
  // configs/quickstart.yaml's comment: with tiny.yaml's init_method_std 0.02 and aux coefficient
  // 0.001 all layers send everything to a few experts (the quickstart test: its own settings do not).
  TempDir dir;
  const auto prefix = (dir.path() / "corpus").string();
  const auto corpus = run_command("bash " + source_path("launch/corpus.sh") + " " + prefix);
  INFO(corpus.output);
  REQUIRE(corpus.exit_code == 0);
  const auto run = dir.path() / "run";
  const auto out = train(source_path("configs/quickstart.yaml"),
                         "--set 'data.data_path=[" + prefix + "_text_document]' --set checkpoint.save= --set logging.run_dir=" +
                             run.string() + " --set hardware.num_threads=1 --set model.init_method_std=0.02 "
                             "--set model.moe_aux_loss_coeff=0.001");
  CHECK(count_of(out, "routing collapse:") == 1);
  CHECK_THAT(out, Contains("routing collapse: MoE layers 0, 1, 2, 3 (of 4)") &&
                      Contains("model.init_method_std 0.02 at hidden_size 128") &&
                      Contains("model.moe_aux_loss_coeff 0.001 with moe_router_load_balancing_type aux_loss"));
  const auto r = run_command(kBin + " report " + run.string());
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(slurp((run / "report" / "report.md").string()), Contains("Routing collapse: MoE layers 0, 1, 2, 3 (of 4)"));
}
