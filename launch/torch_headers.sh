#!/usr/bin/env bash
# Prints a torch package directory holding LibTorch VERSION's headers (include/ and version.py),
# extracted once from the PyPI Linux wheel into the cache and reused:
#   bash launch/torch_headers.sh 2.11.0      # -> ~/.cache/moeforge/torch-2.11.0
# The CPU wheels PyPI has (macOS, Windows) lack the generated CUDA headers
# (c10/cuda/impl/cuda_cmake_macros.h, ATen/cuda/CUDAConfig.h), so this takes the Linux wheel
# (~500 MB, deleted once its headers are out). Progress goes to stderr; the path alone to stdout.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${1:?usage: torch_headers.sh VERSION (e.g. 2.11.0)}
cache=${MOEFORGE_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moeforge}
dir="$cache/torch-$version"
if [[ ! -f "$dir/.complete" ]]; then
  python="$root/.venv/bin/python"
  [[ -x $python ]] || { echo "torch_headers.sh: no venv at $root/.venv; run bash launch/setup.sh first" >&2; exit 1; }
  echo "[torch-headers] fetching the torch $version wheel's headers into $dir" >&2
  rm -rf "$dir" "$dir.download"
  mkdir -p "$dir.download"
  "$python" -m pip download -q --no-deps "torch==$version" --platform manylinux_2_28_x86_64 \
    --python-version 3.12 --only-binary=:all: -d "$dir.download" >&2
  "$python" - "$dir.download" "$dir" <<'PY'
import glob, os, sys, zipfile
download, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(download, "torch-*.whl"))[0])
members = [n for n in wheel.namelist() if n.startswith("torch/include/") or n == "torch/version.py"]
wheel.extractall(download, members)
os.rename(os.path.join(download, "torch"), out)
PY
  rm -rf "$dir.download"
  touch "$dir/.complete"
fi
echo "$dir"
