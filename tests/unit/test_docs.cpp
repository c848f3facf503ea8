// Output excerpts in the docs, checked against the commands that print them. A fenced block right
// after a line `<!-- output of: COMMAND -->` (in docs/*.md or README.md) is meant literally: its
// lines appear in COMMAND's standard output in the same order, consecutive except where the
// excerpt has a line `...`, which stands for any number of lines. Trailing spaces are ignored,
// leading ones are not (tables are aligned). COMMAND runs from the repository root, with
// `build/moeforge` standing for the binary under test; its exit code is not checked (a dry-run
// excerpt of a layout may come from a machine without the datasets).
#include "test_util.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace moeforge;

namespace {

struct Excerpt {
  std::string where;  // file:line of the marker
  std::string command;
  std::vector<std::string> lines;
};

std::string rstrip(std::string s) {
  while (!s.empty() && (s.back() == ' ' || s.back() == '\r')) s.pop_back();
  return s;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(rstrip(line));
  return out;
}

std::vector<Excerpt> excerpts_in(const fs::path& file) {
  const std::string marker = "<!-- output of: ", end = " -->";
  std::vector<Excerpt> out;
  const auto lines = split_lines(test::slurp(file.string()));
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].rfind(marker, 0) != 0 || lines[i].size() < marker.size() + end.size()) continue;
    Excerpt e{fmt::format("{}:{}", file.filename().string(), i + 1),
              lines[i].substr(marker.size(), lines[i].size() - marker.size() - end.size()), {}};
    INFO(e.where << ": the marker must be followed by a fenced block");
    REQUIRE(i + 1 < lines.size());
    REQUIRE(lines[i + 1].rfind("```", 0) == 0);
    size_t j = i + 2;
    for (; j < lines.size() && lines[j].rfind("```", 0) != 0; ++j) e.lines.push_back(lines[j]);
    out.push_back(e);
    i = j;
  }
  return out;
}

// The first excerpt line not where it should be in `output`, with why; nothing when all match.
std::optional<std::string> first_mismatch(const std::vector<std::string>& excerpt, const std::vector<std::string>& output) {
  size_t at = 0;             // the output line the next excerpt line is compared with
  bool anywhere_next = true;  // the first line, and any after "...", may come at any later point
  for (const auto& line : excerpt) {
    if (line == "...") {
      anywhere_next = true;
      continue;
    }
    if (anywhere_next) {
      while (at < output.size() && output[at] != line) ++at;
      if (at == output.size()) return fmt::format("not in the output (after the lines matched before it): \"{}\"", line);
    } else if (at >= output.size() || output[at] != line) {
      return fmt::format("expected \"{}\"\n  output has \"{}\"", line, at < output.size() ? output[at] : "(end)");
    }
    ++at;
    anywhere_next = false;
  }
  return std::nullopt;
}

}  // namespace

TEST_CASE("the excerpt check: consecutive lines, ... skips, a changed line is found", "[docs]") {
  const std::vector<std::string> out = {"head", "a", "b", "c", "d", "tail"};
  CHECK_FALSE(first_mismatch({"a", "b"}, out));
  CHECK_FALSE(first_mismatch({"a", "...", "d"}, out));
  CHECK(first_mismatch({"a", "c"}, out));       // not consecutive without "..."
  CHECK(first_mismatch({"a", "b", "x"}, out));  // a changed line
  CHECK(first_mismatch({"d", "...", "a"}, out));  // order
  CHECK(first_mismatch({" a"}, out));             // leading spaces count
}

TEST_CASE("every documented output excerpt is what its command prints", "[docs][cli]") {
  std::vector<Excerpt> all;
  for (const auto& entry : fs::directory_iterator(test::source_path("docs"))) {
    if (entry.path().extension() == ".md") {
      for (auto& e : excerpts_in(entry.path())) all.push_back(std::move(e));
    }
  }
  for (auto& e : excerpts_in(test::source_path("README.md"))) all.push_back(std::move(e));
  REQUIRE(all.size() >= 2);  // docs/launching.md's dry run and docs/plan.md's plan at least
  const std::string prefix = "build/moeforge ";
  for (const auto& e : all) {
    INFO(e.where << ": " << e.command);
    REQUIRE(e.command.rfind(prefix, 0) == 0);
    const auto r = test::run_command(test::moeforge_binary() + " " + e.command.substr(prefix.size()) + " 2>/dev/null");
    const auto mismatch = first_mismatch(e.lines, split_lines(r.output));
    INFO("regenerate the excerpt by running the command; " << mismatch.value_or(""));
    CHECK_FALSE(mismatch);
  }
}
