#!/usr/bin/env bash
# Run a benchmark case, then its report (docs/report.md):
#   bash launch/run_benchmark.sh [-n NPROC] [-r REFERENCE] [-o RUN_DIR] [-R natural|forced|both] CASE_CONFIG [moeforge train arguments ...]
# Long options: --nproc, --reference, --out, --routing (with a space or '=').
# NPROC: ranks on this node (default: the GPUs nvidia-smi lists, else 1); for several nodes run
# launch/run_multi_node.sh or launch/slurm.sbatch, then `moeforge report RUN_DIR`.
# REFERENCE: a run directory, its metrics.jsonl, or a Megatron-LM log to judge the loss curve by.
# RUN_DIR: default runs/<case>-<UTC time>. The report lands in RUN_DIR/report/.
# ROUTING: natural (default: the router's choice), forced (model.moe_router_force_load_balancing=true:
# every expert gets the same tokens), or both: the case twice, into RUN_DIR/natural and
# RUN_DIR/forced, then one report comparing them with the straggler's cost, in RUN_DIR/report/.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

nproc="" reference="" run_dir="" routing=natural routing_given=""
# Long options become their short ones, so getopts parses both.
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --nproc|--reference|--out|--routing)
      [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
      case $1 in --nproc) args+=(-n "$2") ;; --reference) args+=(-r "$2") ;; --out) args+=(-o "$2") ;; --routing) args+=(-R "$2") ;; esac
      shift 2 ;;
    --nproc=*) args+=(-n "${1#*=}"); shift ;;
    --reference=*) args+=(-r "${1#*=}"); shift ;;
    --out=*) args+=(-o "${1#*=}"); shift ;;
    --routing=*) args+=(-R "${1#*=}"); shift ;;
    --help) args+=(-h); shift ;;
    --) args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]}"
while getopts "n:r:o:R:h" opt; do
  case $opt in
    n) nproc=$OPTARG ;;
    r) reference=$OPTARG ;;
    o) run_dir=$OPTARG ;;
    R) routing=$OPTARG routing_given=1 ;;
    h) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
case $routing in
  natural|forced|both) ;;
  *) echo "error: -R/--routing '$routing': expected natural, forced or both" >&2; exit 2 ;;
esac
if [[ $# -lt 1 ]]; then
  echo "error: no case config given (e.g. configs/flagperf-qwen1.5-moe.yaml)" >&2
  exit 2
fi
config=$1
shift
case_name=$(basename "$config" .yaml)
[[ -n $run_dir ]] || run_dir=runs/$case_name-$(date -u +%Y%m%dT%H%M%SZ)
bin=${MOEFORGE_BIN:-$root/build/moeforge}

ref_args=()
[[ -n $reference ]] && ref_args+=(--reference "$reference")

if [[ $routing == both ]]; then
  # Natural first: the comparison's baseline, whose step time the straggler cost starts from.
  for r in natural forced; do
    force=false
    [[ $r == forced ]] && force=true
    bash "$here/run_single_node.sh" ${nproc:+-n "$nproc"} "$config" --set "logging.run_dir=$run_dir/$r" \
      --set "model.moe_router_force_load_balancing=$force" "$@"
  done
  "$bin" report "$run_dir/natural" "$run_dir/forced" --out "$run_dir/report" "${ref_args[@]}"
  echo "report: $run_dir/report/comparison.html (and comparison.md, comparison.json; each run's in report/natural, report/forced)"
  exit 0
fi
# Without -R the case's own setting stands (today's run); -R natural or forced sets it.
routing_set=()
[[ -n $routing_given ]] && routing_set=(--set "model.moe_router_force_load_balancing=$([[ $routing == forced ]] && echo true || echo false)")
bash "$here/run_single_node.sh" ${nproc:+-n "$nproc"} "$config" --set "logging.run_dir=$run_dir" "${routing_set[@]}" "$@"
"$bin" report "$run_dir" "${ref_args[@]}"
echo "report: $run_dir/report/report.html (and report.md, report.json)"
