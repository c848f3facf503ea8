// defines: source_dir, moeforge_binary, venv_python, mpiexec, comm_probe (where the build put things)
#pragma once

#include <string>

namespace moeforge::test {

// Each is a compile definition of test_paths.cpp alone (see there for why).
std::string source_dir();
std::string moeforge_binary();
std::string venv_python();
std::string mpiexec();
std::string comm_probe();

}  // namespace moeforge::test
