#!/usr/bin/env bash
# Communication overlap benchmark (run by hand; results in docs/parallel.md). The benchmark model
# (tests/bench/bench_model.yaml) under mpirun on this machine, parallel.overlap_comm true against
# false in one run, rounds interleaved: DP=2 (with and without ZeRO-1), DP=2 x EP=2 and PP=2 x DP=2 (4 ranks). Per layout:
# step time, time_comm_s (a collective in flight), time_comm_exposed_s (the compute thread waited),
# the gradient reduction's exposed part (time_grad_reduce_s), the optimizer's (with ZeRO-1's
# parameter all-gather), and the ratios.
#   bash tests/bench/bench_overlap.sh [ITERS] [ROUNDS] [BUCKET_ELEMENTS]
# Buckets of 1M elements by default (Megatron's 40M would make this 13.5M-parameter model one bucket,
# which can only start when the backward has ended).
set -euo pipefail
iters=${1:-8}
rounds=${2:-2}
bucket=${3:-1000000}
source "$(dirname "${BASH_SOURCE[0]}")/bench_env.sh"
bench_yaml "$iters" 1 "parallel: {ddp_bucket_size: $bucket}"
layouts=("dp2:2:" "dp2zero1:2:--set parallel.use_distributed_optimizer=true" "ep2:2:--set parallel.expert_model_parallel_size=2"
         "pp2dp2:4:--set parallel.pipeline_model_parallel_size=2 --set model.moe_router_load_balancing_type=aux_loss")
for round in $(seq "$rounds"); do
  for entry in "${layouts[@]}"; do
    IFS=: read -r name ranks extra <<< "$entry"
    for overlap in true false; do
      run="$work/${name}_${overlap}_$round"
      # shellcheck disable=SC2086
      mpirun --oversubscribe -np "$ranks" build/moeforge --log-level warn train "$work/bench.yaml" $extra \
        --set parallel.overlap_comm=$overlap --set logging.run_dir="$run" > "$run.log" 2>&1 || { cat "$run.log"; exit 1; }
    done
  done
done

$py - "$work" "$rounds" "$iters" "$bucket" <<'PY'
import json, statistics, sys
work, rounds, iters, bucket = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
warm = 2
def steps(name, overlap):
    out = []
    for r in range(1, rounds + 1):
        out += [json.loads(l) for l in open(f"{work}/{name}_{overlap}_{r}/metrics.jsonl")][warm:]
    return out
med = lambda runs, key: statistics.median(m[key] for m in runs)
print(f"overlap benchmark: bench_model (h256, 4 MoE layers, 60 experts), 16 x 256 tokens per step, one thread "
      f"per rank, buckets of {bucket} elements, median of iterations {warm + 1}..{iters} over {rounds} round(s)")
print(f"  {'layout':<10}{'overlap':>8}{'step ms':>10}{'comm ms':>10}{'exposed ms':>12}{'exposed/comm':>14}"
      f"{'grad reduce ms':>16}{'optimizer ms':>14}{'comm thread CPU ms':>20}")
for name in ["dp2", "dp2zero1", "ep2", "pp2dp2"]:
    res = {}
    for overlap in ["true", "false"]:
        s = steps(name, overlap)
        res[overlap] = s
        comm, exposed = med(s, "time_comm_s"), med(s, "time_comm_exposed_s")
        print(f"  {name:<10}{overlap:>8}{med(s, 'step_time_s') * 1e3:>10.1f}{comm * 1e3:>10.1f}{exposed * 1e3:>12.1f}"
              f"{exposed / comm if comm else 0:>14.2f}{med(s, 'time_grad_reduce_s') * 1e3:>16.1f}"
              f"{med(s, 'time_optimizer_s') * 1e3:>14.1f}"
              f"{med(s, 'time_comm_thread_cpu_s') * 1e3:>20.1f}")
    print(f"  {name}: step time overlap on / off {med(res['true'], 'step_time_s') / med(res['false'], 'step_time_s'):.3f}x")
PY
