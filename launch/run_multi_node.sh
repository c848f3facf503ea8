#!/usr/bin/env bash
# Train on several nodes listed in an Open MPI hostfile ("node01 slots=8" per line).
#   bash launch/run_multi_node.sh -H HOSTFILE [-g RANKS_PER_NODE] [-n NPROC] CONFIG [train arguments ...]
# RANKS_PER_NODE defaults to the first host's slots, NPROC to the sum of all slots. The binary and
# the config must be at the same path on every node (a shared file system). Set MOEFORGE_IFACE to
# the interface the nodes reach each other on. Environment: launch/mpi_common.sh; docs/launching.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/mpi_common.sh"

hostfile="" per_node="" nproc=""
while getopts "H:g:n:h" opt; do
  case $opt in
    H) hostfile=$OPTARG ;;
    g) per_node=$OPTARG ;;
    n) nproc=$OPTARG ;;
    h) sed -n '2,6p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ -z $hostfile || ! -r $hostfile ]]; then
  echo "error: -H HOSTFILE is required and must be readable (got '${hostfile}'); one 'host slots=N' per line" >&2
  exit 2
fi
slots=$(grep -v '^\s*#' "$hostfile" | grep -o 'slots=[0-9]*' | cut -d= -f2)
if [[ -z $slots ]]; then
  echo "error: $hostfile gives no 'slots=N': write one 'host slots=N' line per node" >&2
  exit 2
fi
[[ -n $per_node ]] || per_node=$(head -n1 <<< "$slots")
if [[ -z $nproc ]]; then
  nproc=0
  for s in $slots; do nproc=$((nproc + s)); done
fi
moeforge_launch "$nproc" "$per_node" --hostfile "$hostfile" -- "$@"
