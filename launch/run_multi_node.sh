#!/usr/bin/env bash
# Train on several nodes listed in an Open MPI hostfile ("node01 slots=8" per line), under mpirun.
#   bash launch/run_multi_node.sh -H HOSTFILE [-g RANKS_PER_NODE] [-n NPROC] CONFIG [train arguments ...]
# The hostfile is read as mpirun reads it (comments, max_slots, repeated hosts: launch/allocation.sh).
# RANKS_PER_NODE defaults to the hosts' slots, which must then be equal on every host; NPROC to
# RANKS_PER_NODE x hosts. The binary and the config must be at the same path on every node (a shared
# file system). Set MOEFORGE_IFACE to the interface the nodes reach each other on. Environment:
# launch/mpi_common.sh; docs/launching.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/mpi_common.sh"

hostfile="" per_node="" nproc=""
while getopts "H:g:n:h" opt; do
  case $opt in
    H) hostfile=$OPTARG ;;
    g) per_node=$OPTARG ;;
    n) nproc=$OPTARG ;;
    h) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ -z $hostfile || ! -r $hostfile ]]; then
  echo "error: -H HOSTFILE is required and must be readable (got '${hostfile}'); one 'host slots=N' per line" >&2
  exit 2
fi
for value in "$per_node" "$nproc"; do
  if [[ -n $value && ! $value =~ ^[1-9][0-9]*$ ]]; then
    echo "error: -g and -n take a positive whole number (got '$value')" >&2
    exit 2
  fi
done
listing=$(moeforge_hostfile_slots "$hostfile") || exit 2
hosts=() slots=()
while read -r host count; do hosts+=("$host"); slots+=("$count"); done <<< "$listing"

# The same ranks on every node (mpirun --map-by ppr:N:node), as torchrun's --nproc-per-node and
# Megatron's launchers assume: the slots must agree unless -g says how many ranks each node runs.
if [[ -z $per_node ]]; then
  per_node=${slots[0]}
  for i in "${!hosts[@]}"; do
    if [[ ${slots[i]} != "$per_node" ]]; then
      echo "error: $hostfile gives ${hosts[0]} $per_node slots but ${hosts[i]} ${slots[i]}: moeforge runs the same number of ranks on every node; give each host the same slots=N (its GPUs), or -g N for N ranks per node" >&2
      exit 2
    fi
  done
fi
for i in "${!hosts[@]}"; do
  if (( slots[i] < per_node )); then
    echo "error: ${hosts[i]} has ${slots[i]} slots in $hostfile, fewer than the $per_node ranks per node: raise its slots=, or give -g ${slots[i]}" >&2
    exit 2
  fi
done
capacity=$(( per_node * ${#hosts[@]} ))
nproc=${nproc:-$capacity}
if (( nproc > capacity )); then
  echo "error: -n $nproc is more than $per_node ranks per node x ${#hosts[@]} hosts = $capacity" >&2
  exit 2
fi
echo "hostfile $hostfile: ${#hosts[@]} hosts, $per_node ranks per node, $nproc ranks"
moeforge_launch "$nproc" "$per_node" --hostfile "$hostfile" -- "$@"
