#!/usr/bin/env bash
# Preprocessing throughput: `moeforge data preprocess` against the Python `tokenizers` package
# encoding the same texts (encode_batch, all threads), in the same run. Corpus: the Python
# standard library's .py files as JSON lines (offline on every machine). Results: docs/data.md.
#   bash tests/bench/bench_preprocess.sh [WORK_DIR]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${1:-/tmp/moeforge-bench-preprocess}
tok="$root/../shared/data/qwen-tokenizer/tokenizer.json"
py="$root/.venv/bin/python"
mkdir -p "$work"
"$py" - "$work/corpus.jsonl" <<'PY'
import json, pathlib, sys, sysconfig
with open(sys.argv[1], "w") as out:
    for p in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
PY
start=$(date +%s%N)
"$root/build/moeforge" --log-level warn data preprocess --input "$work/corpus.jsonl" --tokenizer "$tok" \
  --output-prefix "$work/ours" --append-eod
ours=$(awk "BEGIN { print ($(date +%s%N) - $start) / 1e9 }")
"$py" - "$work/corpus.jsonl" "$tok" "$ours" <<'PY'
import json, sys, time
from tokenizers import Tokenizer
texts = [json.loads(l)["text"] for l in open(sys.argv[1])]
start = time.perf_counter()
tok = Tokenizer.from_file(sys.argv[2])
n = sum(len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=False))
theirs = time.perf_counter() - start
ours = float(sys.argv[3])
print(f"{len(texts)} documents, {n} tokens: moeforge preprocess {ours:.2f} s ({n / ours / 1e6:.2f} Mtok/s, "
      f"incl. tokenizer load and writing the dataset); tokenizers encode_batch {theirs:.2f} s "
      f"({n / theirs / 1e6:.2f} Mtok/s, incl. load, no writing); ratio {theirs / ours:.1f}x")
PY
