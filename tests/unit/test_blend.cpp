// Megatron's --split and --data-path readings (megatron/core/datasets/utils.py semantics).
#include "core/base/errors.h"
#include "data/blend.h"

#include <catch2/catch.hpp>

using namespace moeforge;
using Catch::Matchers::Contains;

TEST_CASE("split strings parse and normalize like Megatron", "[data]") {
  auto s = data::parse_split("99,1,0");
  CHECK(s[0] == Approx(0.99));
  CHECK(s[1] == Approx(0.01));
  CHECK(s[2] == 0.0);
  s = data::parse_split("969, 30, 1");  // Megatron's default
  CHECK(s[0] == Approx(0.969));
  CHECK(s[2] == Approx(0.001));
  s = data::parse_split("1");  // missing entries are 0
  CHECK(s[0] == 1.0);
  CHECK(s[1] == 0.0);
  s = data::parse_split("80/10/10");
  CHECK(s[1] == Approx(0.1));
  CHECK_THROWS_WITH(data::parse_split("1,1,1,1"), Contains("at most 3"));
  CHECK_THROWS_WITH(data::parse_split("0,0,0"), Contains("sums to 0"));
  CHECK_THROWS_WITH(data::parse_split("-1,2"), Contains("cannot be negative"));
  CHECK_THROWS_WITH(data::parse_split("1.2.3,1"), Contains("not a number"));
  CHECK_THROWS_AS(data::parse_split("abc"), UserError);
  // Stricter than Megatron, which drops what is not a digit or a dot: "nan,1,1" would train as
  // "1,1" and "1e400,1,1" read as four numbers.
  CHECK_THROWS_WITH(data::parse_split("nan,1,1"), Contains("character 1 ('n')"));
  CHECK_THROWS_WITH(data::parse_split("1e400,1,1"), Contains("character 2 ('e')"));
  CHECK_THROWS_WITH(data::parse_split("99;1;0"), Contains("character 3 (';')"));
  CHECK(data::parse_split("99 1\t0")[0] == Approx(0.99));
}

TEST_CASE("data_path reads prefixes or weight-prefix pairs", "[data]") {
  auto b = data::parse_blend({"/data/a_text_document"});
  CHECK(b.prefixes == std::vector<std::string>{"/data/a_text_document"});
  CHECK_FALSE(b.weights);
  b = data::parse_blend({"0.3", "a", "0.7", "b"});
  CHECK(b.prefixes == std::vector<std::string>{"a", "b"});
  CHECK(*b.weights == std::vector<double>{0.3, 0.7});
  b = data::parse_blend({"0.3 a 0.7 b"});  // one string, as on Megatron's command line
  CHECK(b.prefixes.size() == 2);
  b = data::parse_blend({"a", "b"});  // an even number of plain prefixes
  CHECK(b.prefixes == std::vector<std::string>{"a", "b"});
  CHECK_FALSE(b.weights);
  CHECK_THROWS_WITH(data::parse_blend({"0.3", "a", "b", "c"}), Contains("mixes weights and prefixes"));
  CHECK_THROWS_WITH(data::parse_blend({"0", "a", "0", "b"}), Contains("all blend weights are 0"));
}
