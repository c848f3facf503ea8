// defines: check, failures, require, require_contains, error_of, require_same, same_bits, check_memory,
// check_hooks, check_events, run_small_device_checks, run_bad_environment_checks, run_stream_check_checks,
// check_stream_check_off, run_bad_stream_check_setting
//
// The emulated-device probe's helpers and its checks of device behaviour (emulated_probe.cpp has
// the numeric ones and main, emulated_probe_streams.cpp the stream-order checker's).
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>

namespace moeforge::probe {

// Runs `body`, printing "PASS  name" or "FAIL  name: why" (why: the exception it threw).
void check(const std::string& name, const std::function<void()>& body);
int failures();

// Throws std::runtime_error(`what`) unless `ok`.
void require(bool ok, const std::string& what);
void require_contains(const std::string& text, const std::string& part);

// The message of the c10::Error `body` throws (empty when it throws none).
template <typename Error, typename Body>
std::string error_of(Body body) {
  try {
    body();
  } catch (const Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}
// Whether two tensors hold the same dtype, sizes and bytes (NaNs included).
bool same_bits(const torch::Tensor& a, const torch::Tensor& b);
// Requires `device_result` to be an emulated tensor with `cpu_result`'s bits.
void require_same(const torch::Tensor& device_result, const torch::Tensor& cpu_result, const std::string& what);

void check_memory(const torch::Device& dev);
void check_hooks(const torch::Device& dev);
void check_events(const torch::Device& dev);

// The checks of a run with 2 devices of 4 MiB, and of one with a malformed device count; exit codes.
int run_small_device_checks();
int run_bad_environment_checks();

// The stream-order checker (emulated_probe_streams.cpp): its cases in a run with
// MOEFORGE_EMULATED_STREAM_CHECK=1 (an exit code), its silence while unset, and a malformed value.
int run_stream_check_checks();
void check_stream_check_off(const torch::Device& dev);
int run_bad_stream_check_setting();

}  // namespace moeforge::probe
