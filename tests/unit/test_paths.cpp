// The build's paths, as compile definitions of this one file. Spliced into string expressions in
// every test file, a path literal let GCC 12's -Warray-bounds misfire for some checkout paths
// (CI's /check/work/main: a false "offset out of bounds" in an inlined std::string concatenation),
// and it tied every test object to where the tree was cloned, so ccache missed them all.
#include "test_paths.h"

namespace moeforge::test {

std::string source_dir() { return MOEFORGE_SOURCE_DIR; }
std::string moeforge_binary() { return MOEFORGE_BINARY; }
std::string venv_python() { return MOEFORGE_PYTHON; }
std::string mpiexec() { return MOEFORGE_MPIEXEC; }
std::string comm_probe() { return MOEFORGE_COMM_PROBE; }

}  // namespace moeforge::test
