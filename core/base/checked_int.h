// defines: moeforge::CheckedInt
//
// int64 arithmetic that refuses to wrap. Every product of config integers (layout degrees, model
// widths, batch and sequence sizes) goes through it: a wrapped value (PP x TP = 2^64 = 0, a
// negative byte count) passed every later check and crashed with a division by zero or misled the
// plan, where this ends with a message.
#pragma once

#include "core/base/errors.h"

#include <cstdint>

namespace moeforge {

struct CheckedInt {
  int64_t v;
  CheckedInt(int64_t x) : v(x) {}  // NOLINT: implicit, so the formulas read as arithmetic

  [[noreturn]] static void overflow() {
    fail_user("a product of the config's sizes is beyond 64-bit integers (9.2e18). Check parallel.* (the layout "
              "degrees), model.* (hidden_size, num_layers, vocab_size, num_experts, ffn sizes) and training.* "
              "(global_batch_size, micro_batch_size, seq_length) for a typo.");
  }
  friend CheckedInt operator*(CheckedInt a, CheckedInt b) {
    int64_t r = 0;
    if (__builtin_mul_overflow(a.v, b.v, &r)) overflow();
    return r;
  }
  friend CheckedInt operator+(CheckedInt a, CheckedInt b) {
    int64_t r = 0;
    if (__builtin_add_overflow(a.v, b.v, &r)) overflow();
    return r;
  }
  friend CheckedInt operator-(CheckedInt a, CheckedInt b) {
    int64_t r = 0;
    if (__builtin_sub_overflow(a.v, b.v, &r)) overflow();
    return r;
  }
  // Division cannot wrap except INT64_MIN / -1; a zero divisor is a bug the callers' checks exclude.
  friend CheckedInt operator/(CheckedInt a, CheckedInt b) {
    if (b.v == -1 && a.v == INT64_MIN) overflow();
    return a.v / b.v;
  }
  CheckedInt& operator+=(CheckedInt b) { return *this = *this + b; }
};

// The product of config integers, checked: `checked_product(pp, tp)`.
template <typename... Ints>
int64_t checked_product(Ints... factors) {
  return (CheckedInt(1) * ... * CheckedInt(factors)).v;
}

}  // namespace moeforge
