// defines: edit_distance, closest_match
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge {

// Levenshtein distance (insertions, deletions, substitutions).
size_t edit_distance(std::string_view a, std::string_view b);

// The candidate nearest to `word`, if it is near enough to be a plausible typo.
std::optional<std::string> closest_match(std::string_view word, const std::vector<std::string>& candidates);

}  // namespace moeforge
