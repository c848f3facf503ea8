// defines: check, failures, require, require_same, same_bits, check_memory, check_hooks, check_events,
// run_small_device_checks, run_bad_environment_checks
//
// The emulated-device probe's helpers and its checks of device behaviour (emulated_probe.cpp has
// the numeric ones and main).
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

}  // namespace moeforge::probe
