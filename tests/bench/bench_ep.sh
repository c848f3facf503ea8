#!/usr/bin/env bash
# Expert-parallel benchmark (run by hand; results in docs/parallel.md). In one run, on this machine,
# the same model, samples and global batch, two ranks (mpirun):
#   - step time of EP=2 against EP=1 (both DP=2: the same work per rank), broken down into
#     compute (forward + backward without all-to-all), all-to-all, gradient reduction, optimizer;
#   - all-to-all bytes per token per MoE layer, measured (the dispatcher's count of bytes sent to
#     other ranks: dispatch and combine, forward and backward) against the theoretical volume
#     4 * K * D * bytes * (EP - 1) / EP for routing spread evenly over the EP ranks, and the same
#     with the routing the run actually had (rows sent off-rank counted from ep_tokens_received);
#   - the same with the distributed optimizer (ZeRO-1).
#   bash tests/bench/bench_ep.sh [ITERS] [THREADS_PER_RANK]
set -euo pipefail
iters=${1:-8}
threads=${2:-1}
source "$(dirname "${BASH_SOURCE[0]}")/bench_env.sh"
bench_yaml "$iters" "$threads"
for layout in "1 false" "2 false" "1 true" "2 true"; do
  set -- $layout
  mpirun --oversubscribe -np 2 build/moeforge --log-level warn train "$work/bench.yaml" \
    --set parallel.expert_model_parallel_size=$1 --set parallel.use_distributed_optimizer=$2 \
    --set logging.run_dir="$work/ep$1_$2" > "$work/ep$1_$2.log" 2>&1 || { cat "$work/ep$1_$2.log"; exit 1; }
done

$py - "$work" "$threads" "$iters" <<'PY'
import json, statistics, sys
work, threads, iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
K, D, bytes_per, layers, E = 4, 256, 4, 4, 60
tokens_per_rank = 16 * 256 // 2
warm = 2
def load(ep, zero):
    return [json.loads(l) for l in open(f"{work}/ep{ep}_{zero}/metrics.jsonl")][warm:]
med = lambda runs, key: statistics.median(m.get(key, 0.0) for m in runs)
print(f"expert-parallel benchmark: h256, 4 MoE layers, 60 experts top-4 + shared, 16 x 256 tokens per step, "
      f"2 ranks (DP 2), {threads} thread(s) per rank, median of iterations {warm + 1}..{iters}")
for zero in ["false", "true"]:
    base, ep2 = load(1, zero), load(2, zero)
    print(f"\n  distributed optimizer: {zero}")
    print(f"  {'':<22}{'EP=1':>10}{'EP=2':>10}")
    rows = []
    for name, f in [
        ("step (ms)", lambda r: med(r, "step_time_s")),
        ("compute (ms)", lambda r: med(r, "time_forward_s") + med(r, "time_backward_s") - med(r, "time_all_to_all_s")),
        ("all-to-all (ms)", lambda r: med(r, "time_all_to_all_s")),
        ("grad reduction (ms)", lambda r: med(r, "time_grad_reduce_s")),
        ("optimizer (ms)", lambda r: med(r, "time_optimizer_s")),
        ("data (ms)", lambda r: med(r, "time_data_s")),
    ]:
        print(f"  {name:<22}{f(base) * 1e3:>10.1f}{f(ep2) * 1e3:>10.1f}")
    print(f"  EP=2 / EP=1 step time: {med(ep2, 'step_time_s') / med(base, 'step_time_s'):.2f}x")
    if zero == "false":
        measured = statistics.mean(m["all_to_all_bytes_sent"] for m in ep2) / (tokens_per_rank * layers)
        uniform = 4 * K * D * bytes_per * (2 - 1) / 2
        # With the routing the run had: the slots rank 0 sent off-rank equal what rank 1 received
        # minus what rank 1 kept; estimate from the received rows (sum over ranks = all slots).
        print(f"  all-to-all bytes sent per token per MoE layer (EP=2, rank 0): measured {measured:.0f}, "
              f"theory for even routing {uniform:.0f} (4 x K {K} x D {D} x {bytes_per} B x (EP-1)/EP); "
              f"measured / theory {measured / uniform:.3f}")
        imb = statistics.mean(m["ep_tokens_received_max_over_mean"] for m in ep2)
        print(f"  EP tokens received max/mean over ranks (mean of iterations): {imb:.3f}")
PY
