#!/usr/bin/env bash
# Configures and builds moeforge into build/ (Ninja, ccache, precompiled LibTorch header).
#   bash launch/build.sh [TARGET ...] [extra cmake -D options]
# With targets, only those and what they need are built (the quickstart builds `moeforge`);
# without, everything, the tests included. Expects launch/setup.sh to have run. Warnings are
# errors (the build is kept warning-free). MOEFORGE_NEW_BUILD_OPTIONS: CMake options used only when
# build/ is configured for the first time (the quickstart's and CI's lighter builds; an existing
# build/ keeps its settings).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
jobs=${MOEFORGE_JOBS:-$(nproc)}
cmake_args=() targets=()
for a in "$@"; do
  if [[ $a == -D* ]]; then cmake_args+=("$a"); else targets+=("$a"); fi
done
if [[ ! -f build/build.ninja ]]; then
  # shellcheck disable=SC2206  # the options are words
  new_build=(${MOEFORGE_NEW_BUILD_OPTIONS:-})
  cmake -S . -B build -G Ninja -DMOEFORGE_WERROR=ON "${new_build[@]}" "${cmake_args[@]}"
elif ((${#cmake_args[@]})); then
  cmake -S . -B build "${cmake_args[@]}"
fi
ninja -C build -j "$jobs" "${targets[@]}"
command -v ccache >/dev/null && ccache --show-stats 2>/dev/null | grep -iE '^ *(hits|misses|cacheable calls)' | sed 's/^/[ccache] /' || true
