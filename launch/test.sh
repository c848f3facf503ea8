#!/usr/bin/env bash
# The test command: sets everything up, builds, and runs every test.
#   bash launch/test.sh
# Tests needing a GPU are labelled `gpu` and skip visibly without one. Before the tests, the sources
# are compiled against the LibTorch floor's headers (launch/check_torch_floor.sh, ~5 min here).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash launch/setup.sh
# Line tables for debug information (backtraces name file and line) cost a third less compile time
# than full -g; the tests compile file by file as a developer's do.
MOEFORGE_NEW_BUILD_OPTIONS="-DMOEFORGE_DEBUG_INFO=lines" bash launch/build.sh
bash launch/check_torch_floor.sh
cd build
ctest --output-on-failure -j "${MOEFORGE_JOBS:-$(nproc)}"
