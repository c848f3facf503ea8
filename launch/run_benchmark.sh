#!/usr/bin/env bash
# Run a benchmark case, then its report (docs/report.md):
#   bash launch/run_benchmark.sh [-n NPROC] [-r REFERENCE] [-o RUN_DIR] CASE_CONFIG [moeforge train arguments ...]
# NPROC: ranks on this node (default: the GPUs nvidia-smi lists, else 1); for several nodes run
# launch/run_multi_node.sh or launch/slurm.sbatch, then `moeforge report RUN_DIR`.
# REFERENCE: a run directory, its metrics.jsonl, or a Megatron-LM log to judge the loss curve by.
# RUN_DIR: default runs/<case>-<UTC time>. The report lands in RUN_DIR/report/.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

nproc="" reference="" run_dir=""
while getopts "n:r:o:h" opt; do
  case $opt in
    n) nproc=$OPTARG ;;
    r) reference=$OPTARG ;;
    o) run_dir=$OPTARG ;;
    h) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 1 ]]; then
  echo "error: no case config given (e.g. configs/flagperf-qwen1.5-moe.yaml)" >&2
  exit 2
fi
config=$1
shift
case_name=$(basename "$config" .yaml)
[[ -n $run_dir ]] || run_dir=runs/$case_name-$(date -u +%Y%m%dT%H%M%SZ)
bin=${MOEFORGE_BIN:-$root/build/moeforge}

bash "$here/run_single_node.sh" ${nproc:+-n "$nproc"} "$config" --set "logging.run_dir=$run_dir" "$@"
report_args=("$run_dir")
[[ -n $reference ]] && report_args+=(--reference "$reference")
"$bin" report "${report_args[@]}"
echo "report: $run_dir/report/report.html (and report.md, report.json)"
