#!/usr/bin/env bash
# Compiles the C++ sources of the CUDA build against the LibTorch floor's headers, without linking
# (-fsyntax-only, with a precompiled header of that LibTorch), in build-torch-VERSION/: every
# library, the executable, and the GPU, NCCL and benchmark programs a GPU machine builds; not the
# CPU unit tests (tests/unit), which no GPU machine builds and which would add two minutes.
#   bash launch/check_torch_floor.sh [VERSION]      # default: the floor, 2.11.0
# The GPU machines run torch 2.11; the venv's newer torch is what everything else builds against.
# Without nvcc the CUDA-only sources are not in the build, and the first line says so.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
version=${1:-2.11.0}
jobs=${MOEFORGE_JOBS:-$(nproc)}
start=$SECONDS
torch_root=$(bash launch/torch_headers.sh "$version")
dir=build-torch-$version
mkdir -p "$dir"
if ! cmake -S . -B "$dir" -G Ninja -DMOEFORGE_WERROR=ON -DMOEFORGE_TORCH_ROOT="$torch_root" \
     -DMOEFORGE_SYNTAX_ONLY=ON -DCMAKE_BUILD_TYPE=Release >"$dir/configure.log" 2>&1; then
  cat "$dir/configure.log" >&2
  exit 1
fi
echo "[torch-floor] LibTorch $version, $(grep -o 'GPU (CUDA) .*' "$dir/configure.log" | tr -s ' ')"
# What the sources need generated first: the precompiled header and protoc's output. Then every C++
# source's own command (it carries -fsyntax-only), not ninja's graph, which would link libraries.
# Release: no debug information in the precompiled header, which then loads faster.
mapfile -t first < <(ninja -C "$dir" -t targets all | sed -n 's/^\([^/].*\.\(gch\|pb\.h\)\): .*/\1/p')
ninja -C "$dir" -j "$jobs" "${first[@]}"
"$root/.venv/bin/python" - "$dir/compile_commands.json" "$jobs" <<'PY'
import concurrent.futures, json, subprocess, sys
entries = [e for e in json.load(open(sys.argv[1]))
           if e["file"].endswith((".cpp", ".cc", ".cxx"))
           and "cmake_pch" not in e["file"] and "/tests/unit/" not in e["file"]]
def parse(e):
    return e, subprocess.run(e["command"], shell=True, cwd=e["directory"], capture_output=True, text=True)
failed = 0
with concurrent.futures.ThreadPoolExecutor(int(sys.argv[2])) as pool:
    for i, (e, r) in enumerate(pool.map(parse, entries), 1):
        print(f"[{i}/{len(entries)}] {e['file']}{'' if r.returncode == 0 else '  FAILED'}", flush=True)
        if r.returncode:
            failed += 1
            sys.stderr.write(r.stdout + r.stderr)
if failed:
    sys.exit(f"[torch-floor] {failed} of {len(entries)} sources do not compile against this LibTorch")
PY
echo "[torch-floor] every C++ source parses against LibTorch $version ($((SECONDS - start)) s)"
