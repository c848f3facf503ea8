#!/usr/bin/env bash
# Tensor-parallel benchmark (run by hand; results in docs/parallel.md). The benchmark model
# (tests/bench/bench_model.yaml, 4 MoE layers) on 2 ranks of one thread each: DP 2 against TP 2 (each
# layer's heads and widths split in two, the two ranks on the same micro-batches) and TP 2 with
# sequence parallelism, in one run, rounds interleaved. Per layout: step time, tokens/s, rank 0's
# peak memory, and the ratios to DP. On
# CPU the all-reduces are MPI over shared memory; TP is for models whose layers do not fit a GPU.
#   bash tests/bench/bench_tp.sh [ITERS] [ROUNDS]
set -euo pipefail
iters=${1:-8}
rounds=${2:-2}
source "$(dirname "${BASH_SOURCE[0]}")/bench_env.sh"
bench_yaml "$iters" 1
for round in $(seq "$rounds"); do
  for layout in 1 2 2sp; do
    run="$work/tp${layout}_$round"
    sp=false; [[ $layout == *sp ]] && sp=true
    mpirun --oversubscribe -np 2 build/moeforge --log-level warn train "$work/bench.yaml" \
      --set parallel.tensor_model_parallel_size=${layout%sp} --set parallel.sequence_parallel=$sp \
      --set logging.run_dir="$run" > "$run.log" 2>&1 ||
      { cat "$run.log"; exit 1; }
  done
done

$py - "$work" "$rounds" "$iters" <<'PY'
import json, statistics, sys
work, rounds, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
warm = 2
def steps(tp):
    out = []
    for r in range(1, rounds + 1):
        out += [json.loads(l) for l in open(f"{work}/tp{tp}_{r}/metrics.jsonl")][warm:]
    return out
med = lambda runs, key: statistics.median(m[key] for m in runs)
print(f"tensor-parallel benchmark: bench_model (h256, 4 MoE layers, 60 experts), 2 ranks, 16 x 256 tokens per step, "
      f"one thread per rank, median of iterations {warm + 1}..{iters} over {rounds} round(s)")
print(f"  {'layout':>9}{'step ms':>10}{'tokens/s/dev':>14}{'peak MiB':>10}")
res = {}
for tp, name in [("1", "DP 2"), ("2", "TP 2"), ("2sp", "TP 2 SP")]:
    s = steps(tp)
    res[tp] = med(s, "step_time_s")
    peak = max(m.get("peak_memory_bytes", 0) for m in s) / 2**20
    print(f"  {name:>9}{res[tp] * 1e3:>10.1f}{med(s, 'tokens_per_s_per_device'):>14.0f}{peak:>10.0f}")
print(f"  step time TP 2 / DP 2: {res['2'] / res['1']:.3f}x, TP 2 SP / DP 2: {res['2sp'] / res['1']:.3f}x, "
      f"TP 2 SP / TP 2: {res['2sp'] / res['2']:.3f}x")
PY
