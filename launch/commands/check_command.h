// defines: CheckKernelsOptions, run_check_kernels, add_check_kernels_command
//
// `moeforge check kernels [--device D] [--dtype fp32|bf16|all] [--json]`: every fused kernel the
// device has against its reference composition, at the start-up self-check's shapes and at odd,
// empty and the mission's widths (core/kernels/kernel_checks.h); a table or JSON, exit 1 naming the
// kernels that disagree. MOEFORGE_CHECK_KERNELS_FAIL=KERNEL forces that kernel to fail (its fused
// result scaled before the comparison). docs/kernels.md explains it for a vendor porting the kernels.
#pragma once

#include <iosfwd>
#include <string>

namespace CLI {
class App;
}

namespace moeforge {

struct CheckKernelsOptions {
  std::string device = "cpu";  // cpu | cuda | emulated
  std::string dtype = "all";   // fp32 | bf16 | all
  bool json = false;
};

// Prints the table (or JSON) to `out`, the failure line to stderr; returns the exit code (0: every
// check passed or the device has no fused kernel; 1: a check failed). An unavailable device, or an
// unknown kernel in MOEFORGE_CHECK_KERNELS_FAIL, is a UserError.
int run_check_kernels(const CheckKernelsOptions& options, std::ostream& out);

// Adds `kernels` to the `check` command group, parsing into `options`; the subcommand it returns is
// set when the user ran it.
CLI::App* add_check_kernels_command(CLI::App& check, CheckKernelsOptions& options);

}  // namespace moeforge
