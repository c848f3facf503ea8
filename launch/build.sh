#!/usr/bin/env bash
# Configures and builds moeforge into build/ (Ninja, ccache, precompiled LibTorch header).
#   bash launch/build.sh [extra cmake -D options]
# Expects launch/setup.sh to have run. Warnings are errors (the build is kept warning-free).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
jobs=${MOEFORGE_JOBS:-$(nproc)}
if [[ ! -f build/build.ninja ]]; then
  cmake -S . -B build -G Ninja -DMOEFORGE_WERROR=ON "$@"
elif (($#)); then
  cmake -S . -B build "$@"
fi
ninja -C build -j "$jobs"
command -v ccache >/dev/null && ccache --show-stats 2>/dev/null | grep -iE '^ *(hits|misses|cacheable calls)' | sed 's/^/[ccache] /' || true
