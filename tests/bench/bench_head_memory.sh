#!/usr/bin/env bash
# Peak memory of a training step at the Qwen vocabulary (151,936) and sequence 2,048, the LM head
# and loss fused and chunked (model.kernels: fused) against the reference (the whole [2048, 151936]
# logits in fp32, then cross_entropy). Run by hand; results in docs/kernels.md.
#   bash tests/bench/bench_head_memory.sh [THREADS]
# The bench model (tests/bench/bench_model.yaml, hidden 256) with the large vocabulary, one sequence
# per step, fp32, two steps; peak is the process's peak RSS, as the trainer records it per step.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
threads=${1:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bash launch/corpus.sh "$work/corpus" >/dev/null
for kernels in fused reference; do
  cat > "$work/$kernels.yaml" <<YAML
base: $root/tests/bench/bench_model.yaml
model:
  vocab_size: 151936
  kernels: $kernels
training:
  seq_length: 2048
  micro_batch_size: 1
  global_batch_size: 1
  train_iters: 2
  lr_warmup_iters: 1
data:
  data_path: [$work/corpus_text_document]
logging:
  run_dir: $work/run-$kernels
hardware:
  num_threads: $threads
YAML
  echo "== model.kernels: $kernels" >&2
  build/moeforge train "$work/$kernels.yaml" > "$work/$kernels.log" 2>&1 || { tail -20 "$work/$kernels.log"; exit 1; }
done
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
gib = lambda b: b / 2**30
rows = {}
for k in ("fused", "reference"):
    steps = [json.loads(l) for l in open(f"{work}/run-{k}/metrics.jsonl") if l.strip()]
    rows[k] = (max(s["peak_memory_bytes"] for s in steps), 1000 * steps[-1]["step_time_s"], steps[-1]["lm_loss"])
logits = 2048 * 151936 * 4
print("LM head + cross-entropy at vocabulary 151,936, sequence 2,048 (one sequence a step, fp32):")
for k, (peak, ms, loss) in rows.items():
    print(f"  {k:9s} peak RSS {gib(peak):6.3f} GiB   step {ms:8.0f} ms   lm loss {loss:.6f}")
f, r = rows["fused"][0], rows["reference"][0]
print(f"  the fused head saves {gib(r - f):.3f} GiB of peak ({r / f:.2f}x less); one fp32 logits tensor is {gib(logits):.3f} GiB")
print(f"  loss difference fused vs reference: {abs(rows['fused'][2] - rows['reference'][2]):.2e}")
PY
