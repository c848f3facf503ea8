#!/usr/bin/env bash
# Cold-build benchmark (run by hand; results in README.md, "Build time"): a fresh clone of HEAD in a
# temporary directory, an empty ccache, `ninja moeforge` timed (wall and CPU seconds) for each set of
# CMake options given, one after the other on this machine.
#   bash tests/bench/bench_build.sh "" "-DMOEFORGE_DEBUG_INFO=lines -DCMAKE_UNITY_BUILD=ON"
# Each argument is one build's extra options ("" for the defaults). Expects launch/setup.sh to have
# run (the clone links this checkout's .venv).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(($#)) || set -- ""
echo "cold ninja moeforge, $(nproc) cores, $(date -u +%F), commit $(git -C "$root" rev-parse --short HEAD)"
i=0
for options in "$@"; do
  i=$((i + 1))
  git clone -q "$root" "$work/src$i"
  ln -s "$(readlink -f "$root/.venv")" "$work/src$i/.venv"
  export CCACHE_DIR="$work/ccache$i"  # empty: nothing is reused
  # shellcheck disable=SC2086  # the options are words
  cmake -S "$work/src$i" -B "$work/src$i/build" -G Ninja -DMOEFORGE_WERROR=ON $options >"$work/configure$i.log" 2>&1 ||
    { cat "$work/configure$i.log"; exit 1; }
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$work/cpu$i" ninja -C "$work/src$i/build" moeforge >"$work/build$i.log" 2>&1 ||
    { tail -50 "$work/build$i.log"; exit 1; }
  wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  read -r user sys <"$work/cpu$i"
  objects=$(grep -c "Building CXX\|Building CUDA" "$work/build$i.log" || true)
  binary=$(du -m "$work/src$i/build/moeforge" | cut -f1)
  printf '  %-60s wall %6.0f s  CPU %6.0f s  %3d objects  binary %4d MB\n' "${options:-defaults}" "$wall" \
    "$(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }')" "$objects" "$binary"
  rm -rf "$work/src$i" "$CCACHE_DIR"
done
