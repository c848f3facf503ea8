#!/usr/bin/env bash
# Builds the libFuzzer target for the .idx parser with clang (ASan + UBSan) and runs it for a
# bounded time, starting from a few valid indexes. Exits non-zero on any crash or sanitizer report.
#   bash tests/fuzz/run_fuzz.sh [SECONDS] [WORK_DIR]
set -euo pipefail
seconds=${1:-30}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${2:-$root/build/fuzz}
mkdir -p "$work/corpus"
clangxx=$(command -v clang++ || command -v clang++-14)
"$clangxx" -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$root" "$root/tests/fuzz/fuzz_idx.cpp" "$root/data/indexed_dataset.cpp" "$root/core/durable_file.cpp" -lfmt \
  -o "$work/fuzz_idx"
# Seeds: valid indexes as our writer produces them (2 size bytes, then the .idx).
python3 - "$work/corpus" <<'PY'
import struct, sys, os
out = sys.argv[1]
for n, (code, size) in enumerate([(8, 2), (4, 4), (1, 1)]):
    lengths = [3, 0, 5]
    pointers, at = [], 0
    for l in lengths:
        pointers.append(at); at += l * size
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(lengths), 3)
    idx += struct.pack("<3i", *lengths) + struct.pack("<3q", *pointers) + struct.pack("<3q", 0, 1, 3)
    open(os.path.join(out, f"seed{n}"), "wb").write(struct.pack("<H", at) + idx)
PY
# Crash reproducers go to the work directory, not the current one.
log="$work/fuzz.log"
if ASAN_OPTIONS=detect_leaks=1 "$work/fuzz_idx" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$work/" "$work/corpus" >"$log" 2>&1; then
  tail -5 "$log"
else
  grep -B2 -A30 -m1 -E "ERROR|runtime error|deadly signal" "$log" || tail -40 "$log"
  exit 1
fi
