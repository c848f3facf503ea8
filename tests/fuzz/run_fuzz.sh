#!/usr/bin/env bash
# Builds one libFuzzer target with clang (ASan + UBSan) and runs it for a bounded time from its
# seed corpus. Exits non-zero on any crash or sanitizer report.
#   bash tests/fuzz/run_fuzz.sh TARGET [SECONDS] [WORK_DIR]
# TARGET: idx (the .idx parser), safetensors_header, yaml_config (the config loader), hf_config (a
# Hugging Face config.json).
# Seeds: tests/fuzz/corpus/TARGET/ (named as TARGET; idx: written below, as our writer lays indexes out); what the
# fuzzer finds goes to WORK_DIR/TARGET/, never into the source tree.
set -euo pipefail
target=${1:?usage: run_fuzz.sh TARGET [SECONDS] [WORK_DIR]}
seconds=${2:-30}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${3:-$root/build/fuzz}/$target
mkdir -p "$work/corpus"
clangxx=$(command -v clang++ || command -v clang++-14)
core=(core/config/config.cpp core/config/config_schema.cpp core/config/config_loader.cpp core/config/config_validate.cpp core/files/durable_file.cpp
      core/base/text_distance.cpp core/flops/model_size.cpp core/config/logging.cpp)
case "$target" in
  idx) sources=(data/indexed_dataset.cpp data/sigbus_guard.cpp core/files/durable_file.cpp); libs=(-lspdlog -lfmt) ;;
  safetensors_header) sources=(core/files/safetensors_header.cpp); libs=(-lfmt) ;;
  yaml_config) sources=("${core[@]}"); libs=(-lyaml-cpp -lspdlog -lfmt) ;;
  hf_config) sources=(moe/hf_config.cpp core/config/config.cpp core/config/config_validate.cpp core/flops/model_size.cpp); libs=(-lfmt) ;;
  *) echo "run_fuzz.sh: unknown target '$target' (idx, safetensors_header, yaml_config, hf_config)" >&2; exit 1 ;;
esac
"$clangxx" -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -DSPDLOG_COMPILED_LIB -DSPDLOG_FMT_EXTERNAL -I"$root" "$root/tests/fuzz/fuzz_$target.cpp" \
  "${sources[@]/#/$root/}" "${libs[@]}" -o "$work/fuzz_$target"
if [[ -d "$root/tests/fuzz/corpus/$target" ]]; then cp "$root/tests/fuzz/corpus/$target/"* "$work/corpus/"; fi
if [[ "$target" == idx ]]; then
  # Valid indexes as our writer produces them (2 size bytes, then the .idx).
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
fi
# Crash reproducers go to the work directory, not the current one.
log="$work/fuzz.log"
if ASAN_OPTIONS=detect_leaks=1 "$work/fuzz_$target" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$work/" "$work/corpus" >"$log" 2>&1; then
  tail -5 "$log"
else
  grep -B2 -A30 -m1 -E "ERROR|runtime error|deadly signal" "$log" || tail -40 "$log"
  exit 1
fi
