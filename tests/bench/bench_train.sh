#!/usr/bin/env bash
# Training benchmark (run by hand; results in docs/training.md). On the same CPU, threads, model,
# initial weights and samples, ROUNDS times in turn (the ratio is the median of the rounds: this
# machine's speed drifts by 20 % from one minute to the next):
#   - step time of `moeforge train` (model.kernels: fused, and the reference compositions) against
#     a PyTorch + transformers training loop (tests/oracles/train_oracle.py: the same AdamW,
#     clipping, accumulation and schedule, transformers' default grouped_mm experts);
#   - our step broken down into data, forward, backward and optimizer time, and from a profiled
#     run (logging.profile) its GEMM-only time and where the rest goes;
#   - MFU against a pinned peak (PEAK_TFLOPS, default 0.190: the best of 40 fp32 2048^3 matmuls on
#     2 threads of the development machine, 2026-12-01; the start-up calibration moves with load);
#   - peak memory of the run (process RSS minus that of an idle moeforge process holding the
#     same libraries) against the planner's per-rank estimate (`moeforge plan`).
#   bash tests/bench/bench_train.sh [ITERS] [THREADS] [ROUNDS]
set -euo pipefail
iters=${1:-12}
threads=${2:-2}
rounds=${3:-3}
peak=${PEAK_TFLOPS:-0.190}
source "$(dirname "${BASH_SOURCE[0]}")/bench_env.sh"
# The model of tests/bench/bench_model.cpp: h256, 4 layers, 60 experts of 64 (top-4), shared 256.
cat > "$work/overrides.json" <<JSON
{"vocab_size": 384, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
 "num_key_value_heads": 4, "intermediate_size": 1024, "moe_intermediate_size": 64,
 "shared_expert_intermediate_size": 256, "num_experts": 60, "num_experts_per_tok": 4,
 "max_position_embeddings": 256}
JSON
bench_yaml "$iters" "$threads"
# One configuration per run: the kernels and the run directory (and the profiled run's window).
run_config() {  # NAME KERNELS [PROFILE]
  { echo "base: $work/bench.yaml"; echo "model: {kernels: $2}"; echo "hardware: {peak_tflops: $peak}"
    echo "logging: {run_dir: $work/$1${3:+, profile: true, profile_step_start: $((iters - 2)), profile_step_end: $iters}}"
  } > "$work/$1.yaml"
  echo "$work/$1.yaml"
}
$py tests/oracles/train_oracle.py init "$work/init" 1 "$work/overrides.json" 2>/dev/null
build/moeforge data samples "$work/bench.yaml" --first $((iters * 16)) --json 2>/dev/null > "$work/samples.json"
cat > "$work/hparams.json" <<JSON
{"global_batch_size": 16, "micro_batch_size": 4, "train_iters": $iters, "lr": 1.0e-3, "min_lr": 1.0e-4,
 "lr_decay_style": "cosine", "lr_warmup_iters": 2, "lr_decay_iters": $iters, "weight_decay": 0.1,
 "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 1.0, "threads": $threads}
JSON
for r in $(seq 1 "$rounds"); do
  echo "round $r of $rounds: moeforge (fused), PyTorch + transformers, moeforge (reference)" >&2
  build/moeforge --log-level warn train "$(run_config "fused_$r" fused)" --load "$work/init"
  $py tests/oracles/train_oracle.py train "$work/init" "$work/samples.json" "$work/hparams.json" "$work/oracle_$r.json" 2>/dev/null
  build/moeforge --log-level warn train "$(run_config "reference_$r" reference)" --load "$work/init"
done
echo "profiled run (not timed)" >&2
build/moeforge --log-level warn train "$(run_config profiled fused profile)" --load "$work/init"
build/moeforge plan "$work/bench.yaml" --world-size 1 --json 2>/dev/null > "$work/plan.json"
idle_rss=$($py -c "
import resource, subprocess
subprocess.run(['build/moeforge', 'version'], stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")

$py - "$work" "$idle_rss" "$threads" "$rounds" <<'PY'
import json, re, statistics, sys
work, idle, threads, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
load = lambda path: [json.loads(l) for l in open(path)]
warm = 2  # iterations excluded as warm-up
med = lambda xs: statistics.median(xs[warm:])
step_of = lambda run: med([m["step_time_s"] for m in run])
fused = [load(f"{work}/fused_{r}/metrics.jsonl") for r in range(1, rounds + 1)]
refk = [load(f"{work}/reference_{r}/metrics.jsonl") for r in range(1, rounds + 1)]
oracle = [json.load(open(f"{work}/oracle_{r}.json")) for r in range(1, rounds + 1)]
plan = json.load(open(f"{work}/plan.json"))
tokens = 16 * 256
print(f"training benchmark: h256, 4 layers, 60 experts top-4 + shared, 16 x 256 tokens per step, {threads} threads,"
      f" {len(fused[0])} iterations (median of the last {len(fused[0]) - warm}), {rounds} rounds")
print(f"  {'round':<8} {'moeforge fused':>15} {'transformers':>13} {'moeforge reference':>19} {'speed-up':>9} {'fused/reference':>16}")
ratios, kernel_ratios = [], []
for r in range(rounds):
    ours, theirs, ref = step_of(fused[r]), step_of(oracle[r]), step_of(refk[r])
    ratios.append(theirs / ours)
    kernel_ratios.append(ref / ours)
    print(f"  {r + 1:<8} {ours * 1e3:12.1f} ms {theirs * 1e3:10.1f} ms {ref * 1e3:16.1f} ms {ratios[-1]:8.2f}x {kernel_ratios[-1]:15.2f}x")
step = statistics.median(step_of(f) for f in fused)
print(f"  speed-up over PyTorch + transformers (median of {rounds} rounds): {statistics.median(ratios):.2f}x"
      f" (range {min(ratios):.2f}-{max(ratios):.2f}x); fused over reference kernels: {statistics.median(kernel_ratios):.2f}x")
print(f"  moeforge fused: {step * 1e3:.1f} ms/step, {tokens / step:.0f} tokens/s")
loss_diff = max(abs(a["lm_loss"] - b["lm_loss"]) / b["lm_loss"] for a, b in zip(fused[0], oracle[0]))
print(f"  largest relative lm-loss difference over the run: {loss_diff:.2e}")
ours = fused[0]
print("  our step, broken down (median, round 1):")
for key in ["time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s"]:
    v = med([m[key] for m in ours])
    print(f"    {key[5:-2]:<10} {v * 1e3:8.1f} ms  {100 * v / step_of(ours):5.1f} %")
other = step_of(ours) - sum(med([m[k] for m in ours]) for k in ["time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s"])
print(f"    {'other':<10} {other * 1e3:8.1f} ms  {100 * other / step_of(ours):5.1f} %")
print(f"  MFU (Megatron formula, pinned peak {ours[-1]['peak_tflops']:.3f} TFLOP/s): {100 * med([m['mfu'] for m in ours]):.1f} %")

# The profiled run: its table's wall time covers the profiled iterations; GEMMs are the matrix
# products (dense and grouped); attention is SDPA's fused CPU kernel, forward and backward.
table = open(f"{work}/profiled/profile/top_ops.txt").read()
wall_ms = float(re.search(r"\(([0-9.]+) ms wall\)", table).group(1))
ops = [(float(m.group(1)), m.group(3)) for m in re.finditer(r"^\s+([0-9.]+)\s+([0-9.]+)%\s+\d+\s+(\S+)", table, re.M)]
gemm_names = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}
gemm = sum(ms for ms, name in ops if name in gemm_names)
attention = sum(ms for ms, name in ops if "scaled_dot_product" in name)
print(f"  profiled iterations: {wall_ms:.1f} ms wall; GEMMs {gemm:.1f} ms ({100 * gemm / wall_ms:.1f} %),"
      f" attention kernels {attention:.1f} ms ({100 * attention / wall_ms:.1f} %)")
print(f"  step time / GEMM-only time: {wall_ms / gemm:.2f}x (goal 1.2x); with attention counted as GEMM work:"
      f" {wall_ms / (gemm + attention):.2f}x")
print("  where the time goes (top operators by self time):")
for ms, name in sorted(ops, reverse=True)[:10]:
    print(f"    {ms:9.1f} ms  {100 * ms / wall_ms:5.1f} %  {name}")

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
