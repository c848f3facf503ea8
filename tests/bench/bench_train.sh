#!/usr/bin/env bash
# Training benchmark (run by hand; results in docs/training.md). In one run, on the same CPU,
# threads, model, initial weights and samples:
#   - step time of `moeforge train` against a PyTorch + transformers training loop
#     (tests/oracles/train_oracle.py: the same AdamW, clipping, accumulation and schedule);
#   - our step broken down into data, forward, backward and optimizer time;
#   - peak memory of the run (process RSS minus that of an idle moeforge process holding the
#     same libraries) against the planner's per-rank estimate (`moeforge plan`).
#   bash tests/bench/bench_train.sh [ITERS] [THREADS]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
iters=${1:-12}
threads=${2:-2}
py=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bash launch/corpus.sh "$work/corpus" >/dev/null
# The model of tests/bench/bench_model.cpp: h256, 4 layers, 60 experts of 64 (top-4), shared 256.
cat > "$work/overrides.json" <<JSON
{"vocab_size": 384, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
 "num_key_value_heads": 4, "intermediate_size": 1024, "moe_intermediate_size": 64,
 "shared_expert_intermediate_size": 256, "num_experts": 60, "num_experts_per_tok": 4,
 "max_position_embeddings": 256}
JSON
cat > "$work/bench.yaml" <<YAML
base: $root/tests/bench/bench_model.yaml
training:
  train_iters: $iters
data:
  data_path: [$work/corpus_text_document]
logging:
  run_dir: $work/run
hardware:
  num_threads: $threads
YAML
$py tests/oracles/train_oracle.py init "$work/init" 1 "$work/overrides.json" 2>/dev/null
build/moeforge --log-level warn train "$work/bench.yaml" --load "$work/init"
build/moeforge data samples "$work/bench.yaml" --first $((iters * 16)) --json 2>/dev/null > "$work/samples.json"
cat > "$work/hparams.json" <<JSON
{"global_batch_size": 16, "micro_batch_size": 4, "train_iters": $iters, "lr": 1.0e-3, "min_lr": 1.0e-4,
 "lr_decay_style": "cosine", "lr_warmup_iters": 2, "lr_decay_iters": $iters, "weight_decay": 0.1,
 "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 1.0, "threads": $threads}
JSON
$py tests/oracles/train_oracle.py train "$work/init" "$work/samples.json" "$work/hparams.json" "$work/reference.json" 2>/dev/null
build/moeforge plan "$work/bench.yaml" --world-size 1 --json 2>/dev/null > "$work/plan.json"
idle_rss=$($py -c "
import resource, subprocess
subprocess.run(['build/moeforge', 'version'], stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")

$py - "$work" "$idle_rss" "$threads" <<'PY'
import json, statistics, sys
work, idle, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ours = [json.loads(l) for l in open(f"{work}/run/metrics.jsonl")]
ref = json.load(open(f"{work}/reference.json"))
plan = json.load(open(f"{work}/plan.json"))
warm = 2  # iterations excluded as warm-up
med = lambda xs: statistics.median(xs[warm:])
step, ref_step = med([m["step_time_s"] for m in ours]), med([r["step_time_s"] for r in ref])
tokens = 16 * 256
print(f"training benchmark: h256, 4 layers, 60 experts top-4 + shared, 16 x 256 tokens per step, {threads} threads,"
      f" {len(ours)} iterations (median of the last {len(ours) - warm})")
print(f"  moeforge train           {step * 1e3:8.1f} ms/step  {tokens / step:8.0f} tokens/s")
print(f"  PyTorch + transformers   {ref_step * 1e3:8.1f} ms/step  {tokens / ref_step:8.0f} tokens/s")
print(f"  speed-up                 {ref_step / step:8.2f}x")
loss_diff = max(abs(a["lm_loss"] - b["lm_loss"]) / b["lm_loss"] for a, b in zip(ours, ref))
print(f"  largest relative lm-loss difference over the run: {loss_diff:.2e}")
print("  our step, broken down (median):")
for key in ["time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s"]:
    v = med([m[key] for m in ours])
    print(f"    {key[5:-2]:<10} {v * 1e3:8.1f} ms  {100 * v / step:5.1f} %")
other = step - sum(med([m[k] for m in ours]) for k in ["time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s"])
print(f"    {'other':<10} {other * 1e3:8.1f} ms  {100 * other / step:5.1f} %")
print(f"  MFU (Megatron formula, calibrated peak {ours[-1]['peak_tflops']:.3f} TFLOP/s): {100 * med([m['mfu'] for m in ours]):.1f} %")
peak = max(m["peak_memory_bytes"] for m in ours)
stage = plan["memory"]["stages"][0]
gib = lambda b: b / 2**30
print(f"  memory: process peak RSS {gib(peak):.3f} GiB, idle moeforge process {gib(idle):.3f} GiB,"
      f" training's own {gib(peak - idle):.3f} GiB")
print(f"          planner estimate {gib(stage['peak_bytes']):.3f} GiB (weights {gib(stage['weight_bytes']):.3f},"
      f" grads {gib(stage['gradient_bytes']):.3f}, optimizer {gib(stage['optimizer_bytes']):.3f},"
      f" activations {gib(stage['activation_bytes_per_micro_batch']):.3f} per micro-batch)")
print(f"          measured / planned = {(peak - idle) / stage['peak_bytes']:.2f}")
PY
