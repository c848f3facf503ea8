#!/usr/bin/env bash
# Pipeline schedule benchmark (run by hand; results in docs/parallel.md). The benchmark model
# (tests/bench/bench_model.yaml, 4 layers) on PP 2 (2 ranks, one thread each), the plain 1F1B
# (parallel.virtual_pipeline_model_parallel_size 1: 2 layers per stage) against interleaved 1F1B
# (2 chunks of one layer per stage) in one run, rounds interleaved, at 2, 4 and 8 micro-batches per
# step. Per case: step time, rank 0's pipeline wait (bubble and transfers) and its share of the
# step against the formula, and the step-time ratio interleaved / plain.
#   bash tests/bench/bench_pipeline.sh [ITERS] [ROUNDS]
set -euo pipefail
iters=${1:-8}
rounds=${2:-2}
source "$(dirname "${BASH_SOURCE[0]}")/bench_env.sh"
bench_yaml "$iters" 1 "model: {moe_router_load_balancing_type: aux_loss}
parallel: {pipeline_model_parallel_size: 2}"
micro_batch_sizes=(8 4 2)  # 16 samples per step: M = 2, 4, 8
for round in $(seq "$rounds"); do
  for mbs in "${micro_batch_sizes[@]}"; do
    for vpp in 1 2; do
      run="$work/mbs${mbs}_vpp${vpp}_$round"
      mpirun --oversubscribe -np 2 build/moeforge --log-level warn train "$work/bench.yaml" \
        --set training.micro_batch_size="$mbs" --set parallel.virtual_pipeline_model_parallel_size=$vpp \
        --set logging.run_dir="$run" > "$run.log" 2>&1 || { cat "$run.log"; exit 1; }
    done
  done
done

$py - "$work" "$rounds" "$iters" <<'PY'
import json, statistics, sys
work, rounds, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
warm = 2
def steps(mbs, vpp):
    out = []
    for r in range(1, rounds + 1):
        out += [json.loads(l) for l in open(f"{work}/mbs{mbs}_vpp{vpp}_{r}/metrics.jsonl")][warm:]
    return out
med = lambda runs, key: statistics.median(m[key] for m in runs)
print(f"pipeline benchmark: bench_model (h256, 4 MoE layers, 60 experts), PP 2 x DP 1, 16 x 256 tokens per step, "
      f"one thread per rank, median of iterations {warm + 1}..{iters} over {rounds} round(s)")
print(f"  {'micro-batch':>11}{'M':>4}{'V':>3}{'step ms':>10}{'wait ms':>10}{'wait/step':>11}{'formula':>9}")
for mbs in [8, 4, 2]:
    M = 16 // mbs
    res = {}
    for vpp in [1, 2]:
        s = steps(mbs, vpp)
        res[vpp] = med(s, "step_time_s")
        wait = med(s, "time_pipeline_wait_s")
        formula = 1 / (vpp * M + 1)  # (PP - 1) / (V M + PP - 1) with PP = 2
        print(f"  {mbs:>11}{M:>4}{vpp:>3}{res[vpp] * 1e3:>10.1f}{wait * 1e3:>10.1f}{wait / res[vpp]:>10.1%}{formula:>9.1%}")
    print(f"  micro-batch {mbs}: step time interleaved / plain {res[2] / res[1]:.3f}x")
PY
