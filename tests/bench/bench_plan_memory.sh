#!/usr/bin/env bash
# The memory plan's per-rank peak (`moeforge plan --json`: each stage's peak_bytes) against the peak
# the emulated device measures (its caching allocator's, as CUDA's), per layout, each 2 ranks under
# mpirun with host-staged collectives. Prints one row per layout: rank 0's plan (its stage) against
# its measured peak allocated (metrics.jsonl holds rank 0's), and the largest stage's plan against
# the largest peak reserved over the ranks (rank_times). docs/plan.md keeps the results.
#   bash tests/bench/bench_plan_memory.sh [CONFIG]   (default configs/tiny.yaml; needs the quickstart corpus)
set -euo pipefail
cd "$(dirname "$0")/../.."
config=${1:-configs/tiny.yaml}
bin=./build/moeforge
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(--set training.train_iters=3 --set training.lr_warmup_iters=0 --set training.eval_iters=0
        --set model.kernels=reference)
declare -a names=(ep2 pp2 tp2_sp)
declare -A layouts=(
  [ep2]="--set parallel.expert_model_parallel_size=2"
  [pp2]="--set parallel.pipeline_model_parallel_size=2"
  [tp2_sp]="--set parallel.tensor_model_parallel_size=2 --set parallel.sequence_parallel=true"
)
printf '%-8s %14s %18s %8s %14s %18s %8s\n' layout "rank 0 plan" "rank 0 allocated" ratio "largest plan" "largest reserved" ratio
for name in "${names[@]}"; do
  # shellcheck disable=SC2206
  args=(${layouts[$name]})
  "$bin" plan "$config" --world-size 2 --json "${common[@]}" "${args[@]}" > "$out/$name.plan.json" 2> /dev/null
  mpirun --oversubscribe -np 2 "$bin" train "$config" "${common[@]}" "${args[@]}" --set hardware.device=emulated \
    --set logging.run_dir="$out/$name" > "$out/$name.log" 2>&1 || { cat "$out/$name.log"; exit 1; }
  python3 - "$out/$name.plan.json" "$out/$name/metrics.jsonl" "$name" <<'EOF'
import json, sys
stages = [stage["peak_bytes"] for stage in json.load(open(sys.argv[1]))["memory"]["stages"]]
steps = [json.loads(line) for line in open(sys.argv[2])]
allocated = max(s["peak_memory_allocated_bytes"] for s in steps)
reserved = max(max(s["rank_times"]["peak_memory_reserved_bytes"]) for s in steps)
gib = 2.0 ** 30
print(f"{sys.argv[3]:<8} {stages[0] / gib:14.3f} {allocated / gib:18.3f} {allocated / stages[0]:8.2f} "
      f"{max(stages) / gib:14.3f} {reserved / gib:18.3f} {reserved / max(stages):8.2f}")
EOF
done
