// defines: moeforge::UserError, moeforge::fail_user
//
// Two kinds of failure exist. A UserError is something the user can fix (a bad config value, an
// impossible layout, a missing file): `main` prints its message alone and exits non-zero, with no
// stack dump. Anything else (std::exception) is a bug in moeforge and is reported as such.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moeforge {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& message) : std::runtime_error(message) {}
};

// Throws a UserError with a fmt-formatted message.
template <typename... Args>
[[noreturn]] void fail_user(fmt::format_string<Args...> format, Args&&... args) {
  throw UserError(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace moeforge
