# shellcheck shell=bash
# Shared by run_single_node.sh, run_multi_node.sh and slurm.sbatch (sourced, not run): starts
# `moeforge train` under Open MPI's mpirun (or, in a SLURM job, srun) with the settings a GPU
# cluster job needs, after a `train --dry-run` for the same world size has passed (a layout mistake
# fails here, in seconds, not after a queue wait). Settings and their reasons: docs/launching.md.
#
#   moeforge_launch NPROC PER_NODE [launcher arguments ...] -- CONFIG [moeforge train arguments ...]
#
# Environment (all optional):
#   MOEFORGE_BIN         the binary (default: build/moeforge of this checkout)
#   MOEFORGE_LAUNCHER    mpirun (default) or srun (inside a SLURM allocation; the MPI ranks start
#                        through PMIx, srun --mpi=pmix)
#   MOEFORGE_IFACE       network interface for MPI's and NCCL's TCP traffic (e.g. eth0, ib0); sets
#                        NCCL_SOCKET_IFNAME unless that is set
#   MOEFORGE_BIND        numa (default: each rank bound to a NUMA domain, ranks spread in order),
#                        core, or none (always none when ranks outnumber cores)
#   MOEFORGE_SKIP_DRY_RUN=1   launch without the dry run
#   MOEFORGE_MPIRUN      the mpirun to use (default: mpirun on PATH)
#   MOEFORGE_SRUN        the srun to use (default: srun on PATH)
#   MOEFORGE_SRUN_MPI    srun's --mpi plugin (default pmix; pmi2 where SLURM lacks PMIx)
#   MOEFORGE_STARTUP_TIMEOUT_S  how long a rank waits at start-up (MPI_Init, the config, the process
#                        groups) for the others before the job ends (default 600, as moeforge's own)
# Variables named NCCL_*, UCX_*, CUDA_*, MOEFORGE_*, OMP_*, PYTORCH_* and TORCH_* are passed to
# every rank, on every node (mpirun: -x each; srun: --export=ALL).

moeforge_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

source "$moeforge_root/launch/allocation.sh"

# The environment every rank needs, whichever launcher starts it: exported here, so mpirun forwards
# it (-x) and srun passes it on (--export=ALL). PER_NODE: the ranks on each node.
moeforge_rank_environment() {
  local per_node=$1
  # Megatron's setting: one hardware queue per device, so kernels run in launch order and the
  # communication kernels of the pipeline and the all-to-all do not wait behind compute.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Start-up comes before the config's timeouts: bounded by this (parallel/comm/watchdog.h), set
  # here so a job that lost a rank at start-up ends, visibly, instead of sitting in MPI_Init.
  export MOEFORGE_STARTUP_TIMEOUT_S=${MOEFORGE_STARTUP_TIMEOUT_S:-600}
  # Containers often forbid the cross-memory attach Open MPI's shared-memory transport tries first.
  export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
  if [[ $EUID -eq 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  if [[ -n ${MOEFORGE_IFACE:-} ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$MOEFORGE_IFACE}
  fi
  # Threads per rank: this node's cores shared by its ranks (LibTorch's CPU work, data loading).
  local cores
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / per_node > 0 ? cores / per_node : 1 ))}
}

moeforge_launch() {
  local nproc=$1 per_node=$2
  shift 2
  local -a launcher_args=()
  while [[ $# -gt 0 && $1 != "--" ]]; do launcher_args+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  if [[ $# -lt 1 ]]; then
    echo "error: no experiment config given (usage: ... CONFIG [moeforge train arguments])" >&2
    return 2
  fi
  local bin=${MOEFORGE_BIN:-$moeforge_root/build/moeforge}
  if [[ ! -x $bin ]]; then
    echo "error: $bin does not exist or is not executable: build it (bash launch/build.sh) or set MOEFORGE_BIN" >&2
    return 2
  fi
  local launcher=${MOEFORGE_LAUNCHER:-mpirun} run
  case $launcher in
    mpirun) run=${MOEFORGE_MPIRUN:-mpirun} ;;
    srun) run=${MOEFORGE_SRUN:-srun} ;;
    *) echo "error: MOEFORGE_LAUNCHER=$launcher: expected mpirun or srun" >&2; return 2 ;;
  esac
  if ! command -v "$run" > /dev/null; then
    if [[ $launcher == srun ]]; then
      echo "error: $run not found: srun runs inside a SLURM allocation (or set MOEFORGE_SRUN, or MOEFORGE_LAUNCHER=mpirun)" >&2
    else
      echo "error: $run not found: install Open MPI (bash launch/setup.sh) or set MOEFORGE_MPIRUN" >&2
    fi
    return 2
  fi

  moeforge_rank_environment "$per_node"
  local cores
  cores=$(nproc)
  local bind=${MOEFORGE_BIND:-numa} oversubscribed=0
  case $bind in
    numa|core|none) ;;
    *) echo "error: MOEFORGE_BIND=$bind: expected numa, core or none" >&2; return 2 ;;
  esac
  if (( per_node > cores )); then
    bind=none oversubscribed=1
  fi
  local -a cmd=("$run") env_args=()
  if [[ $launcher == mpirun ]]; then
    cmd+=(-np "$nproc" "${launcher_args[@]}")
    if [[ -n ${MOEFORGE_IFACE:-} ]]; then
      cmd+=(--mca btl_tcp_if_include "$MOEFORGE_IFACE" --mca oob_tcp_if_include "$MOEFORGE_IFACE")
    fi
    if (( oversubscribed )); then cmd+=(--oversubscribe); fi
    case $bind in
      numa) cmd+=(--map-by "ppr:${per_node}:node" --bind-to numa) ;;
      core) cmd+=(--map-by "ppr:${per_node}:node:PE=$(( cores / per_node ))" --bind-to core) ;;
      none) cmd+=(--map-by "ppr:${per_node}:node" --bind-to none) ;;
    esac
    local name
    for name in $(compgen -e); do
      case $name in
        NCCL_*|UCX_*|CUDA_*|MOEFORGE_*|OMP_*|PYTORCH_*|TORCH_*|LD_LIBRARY_PATH|PATH) env_args+=(-x "$name") ;;
      esac
    done
  else
    # Each rank reads Open MPI's settings from its environment (no mpirun to pass them).
    if [[ -n ${MOEFORGE_IFACE:-} ]]; then
      export OMPI_MCA_btl_tcp_if_include=${OMPI_MCA_btl_tcp_if_include:-$MOEFORGE_IFACE}
    fi
    cmd+=(--kill-on-bad-exit=1 "--mpi=${MOEFORGE_SRUN_MPI:-pmix}" --export=ALL
          "--ntasks=$nproc" "--ntasks-per-node=$per_node"
          "--cpus-per-task=$(( cores / per_node > 0 ? cores / per_node : 1 ))")
    if (( oversubscribed )); then cmd+=(--overcommit); fi
    case $bind in
      numa) cmd+=(--cpu-bind=ldoms) ;;
      core) cmd+=(--cpu-bind=cores) ;;
      none) cmd+=(--cpu-bind=none) ;;
    esac
    cmd+=("${launcher_args[@]}")
  fi

  if [[ ${MOEFORGE_SKIP_DRY_RUN:-0} != 1 ]]; then
    local report
    report=$(mktemp)
    if ! "$bin" train "$@" --dry-run --world-size "$nproc" > "$report" 2>&1; then
      cat "$report" >&2
      rm -f "$report"
      echo "error: the dry run for world size $nproc failed (above); nothing was launched" >&2
      return 1
    fi
    echo "dry run for world size $nproc passed ($(grep -m1 '^layout' "$report" | sed 's/^layout *//'))"
    rm -f "$report"
  fi
  echo "+ ${cmd[*]} $bin train $*"
  "${cmd[@]}" "${env_args[@]}" "$bin" train "$@"
}
