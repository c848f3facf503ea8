#!/usr/bin/env bash
# Installs everything moeforge needs to build and test, idempotently.
#
#   bash launch/setup.sh            # apt packages + LibTorch venv + test-oracle packages
#   bash launch/setup.sh --runtime  # only what building and training need (the quickstart): no
#                                   # test oracles, no browser or fuzzing compiler
#   MOEFORGE_SKIP_APT=1 ...         # skip the apt step (no root, packages already there)
#   MOEFORGE_VENV_CACHE=DIR ...     # where cached venvs live (default ~/.cache/moeforge)
#
# The torch wheel and its CUDA libraries are several GB, so the venv lives in a per-user cache
# directory keyed by the hash of the requirements files; `.venv` in the checkout is a symlink to
# it, and every clone on this machine with the same requirements reuses it.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

say() { printf '[setup] %s\n' "$*"; }

runtime_only=0
[[ ${1:-} == --runtime ]] && runtime_only=1

# ---- Debian packages --------------------------------------------------------------------------
apt_packages=(
  build-essential cmake ninja-build ccache pkg-config git
  python3 python3-venv
  libopenmpi-dev openmpi-bin
  libyaml-cpp-dev libspdlog-dev libfmt-dev catch2 libcli11-dev nlohmann-json3-dev libpcre2-dev
  libutf8proc-dev libssl-dev
  libprotobuf-dev protobuf-compiler libboost-dev
)
# Only the tests need these: libFuzzer, a real headless browser for report.html, and `ip` for the
# test hosts (tests/hosts: network namespaces).
((runtime_only)) || apt_packages+=(clang libclang-rt-14-dev chromium iproute2)
if [[ "${MOEFORGE_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing apt packages: ${missing[*]}"
    sudo_cmd=()
    [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "apt packages: all ${#apt_packages[@]} present"
  fi
fi

# ---- Python venv with the pinned torch wheel (LibTorch) and test oracles -----------------------
python=${MOEFORGE_PYTHON:-python3}
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# Keyed by the torch requirements only: a new test oracle is installed into the same venv (below)
# instead of downloading the torch wheel again.
key=$(cat launch/requirements-torch.txt <(echo "python$pyver") | sha256sum | cut -c1-16)
cache=${MOEFORGE_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moeforge}
venv="$cache/venv-$key"

if [[ -f "$venv/.complete" ]]; then
  say "venv: reusing $venv"
else
  say "venv: creating $venv (python $pyver; the torch wheel with its CUDA libraries is several GB)"
  mkdir -p "$cache"
  # Built in place (venv scripts embed their path); `.complete` is written last, so an
  # interrupted install is detected and redone from scratch.
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r launch/requirements-torch.txt
  touch "$venv/.complete"
  say "venv: installed $(grep -v '^#' launch/requirements-torch.txt | xargs)"
fi
# The test oracles go into the same venv the first time the tests need them, and again whenever
# their list changes (marker keyed by the list, written last).
test_key=$(sha256sum < launch/requirements-test.txt | cut -c1-16)
if ((!runtime_only)) && [[ ! -f "$venv/.complete-test-$test_key" ]]; then
  "$venv/bin/pip" install -q -r launch/requirements-test.txt
  touch "$venv/.complete-test-$test_key"
  say "venv: installed the test oracles $(grep -v '^#' launch/requirements-test.txt | xargs)"
fi
ln -sfn "$venv" .venv

torch_info=$(.venv/bin/python - <<'PY' 2>/dev/null
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
PY
)
say "found: $torch_info; cmake $(cmake --version | head -1 | cut -d' ' -f3); ninja $(ninja --version); ccache $(ccache --version | head -1 | cut -d' ' -f3); mpirun $(mpirun --version 2>/dev/null | head -1 | awk '{print $NF}')"
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  nv=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  say "found: nvcc $("$nv" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
else
  say "found: no nvcc (CPU-only build)"
fi
