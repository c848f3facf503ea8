#!/usr/bin/env bash
# Train on one node: one rank per GPU (or -n ranks), under mpirun.
#   bash launch/run_single_node.sh [-n NPROC] CONFIG [moeforge train arguments ...]
# NPROC defaults to the GPUs nvidia-smi lists (1 without GPUs). A dry run for the same world size
# runs first. Environment: launch/mpi_common.sh; settings explained in docs/launching.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/mpi_common.sh"

nproc=""
while getopts "n:h" opt; do
  case $opt in
    n) nproc=$OPTARG ;;
    h) sed -n '2,5p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ -z $nproc ]]; then
  nproc=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
  [[ $nproc -gt 0 ]] || nproc=1
fi
moeforge_launch "$nproc" "$nproc" -- "$@"
