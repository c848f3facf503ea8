// defines: kExitSignals, exit_signal_number
//
// The signals a run may be asked to stop on (training.exit_signal, Megatron's --exit-signal): the
// one table of their names, read by the config's validation and the trainer's handler.
#pragma once

#include <csignal>
#include <optional>
#include <string_view>
#include <utility>

namespace moeforge {

inline constexpr std::pair<std::string_view, int> kExitSignals[] = {
    {"SIGTERM", SIGTERM}, {"SIGINT", SIGINT}, {"SIGHUP", SIGHUP}, {"SIGUSR1", SIGUSR1}, {"SIGUSR2", SIGUSR2}};

inline std::optional<int> exit_signal_number(std::string_view name) {
  for (const auto& [n, number] : kExitSignals) {
    if (n == name) return number;
  }
  return std::nullopt;
}

}  // namespace moeforge
