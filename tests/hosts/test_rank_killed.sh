#!/usr/bin/env bash
# ctest "a rank killed on a test host mid-training": launch/run_multi_node.sh on two test hosts x 2
# ranks, in the two layouts of test_multi_node.sh, and kill -9 of one rank of host 2 mid-training:
#   EP: PP 1 x DP 4, EP 2, ranks by node: rank 1 (host 2), whose EP group [0, 1] crosses to host 1;
#       every step runs several asynchronous all-to-alls across the hosts
#   PP: PP 2 x DP 2, EP 2, ranks by slot: rank 2 (host 2, stage 1), whose pipeline sends and
#       receives go to rank 0 (host 1, stage 0) every micro-batch
# Asserted for each: the kill lands mid-training (at least 5 iterations in metrics.jsonl, fewer than
# train_iters when the job has ended, each with time in the all-to-all, or waiting on the pipeline's
# other stage: time_all_to_all_s, time_pipeline_wait_s); the job ends within 30 s of the kill with a non-zero status
# and mpirun's message naming the rank, its PID and its node; when mpirun has returned, no process
# is left in any of the fixture's namespaces. At the end, after the fixture's teardown: no
# namespace of the fixture, no process of the test, no Open MPI session directory of its hosts.
# Everything is bounded (timeout). docs/test_hosts.md. Exits 77 (skipped) without namespaces.
#   bash tests/hosts/test_rank_killed.sh MOEFORGE_BINARY
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=hosts_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/hosts_common.sh"
hosts_begin "${1:?usage: test_rank_killed.sh MOEFORGE_BINARY}"
hosts_write_config
hosts_mpi_env
iters=400

# The PID of world rank RANK on HOST (its environment's OMPI_COMM_WORLD_RANK).
rank_pid() {
  local pid
  for pid in $(ip netns pids "$1"); do
    if [[ $(cat "/proc/$pid/comm" 2> /dev/null) == moeforge ]] &&
      tr '\0' '\n' < "/proc/$pid/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}
lines() { if [[ -f $1 ]]; then wc -l < "$1"; else echo 0; fi; }

# layout NAME RANKING RANK KEY [train arguments]: kill -9 world rank RANK (on host 2) mid-training;
# KEY: the metric that is positive on every iteration logged (the exchange each step runs).
layout() {
  local name=$1 ranking=$2 rank=$3 key=$4
  shift 4
  local log=$work/$name.log metrics=$work/$name.run/metrics.jsonl
  local start=$SECONDS
  OMPI_MCA_rmaps_base_ranking_policy=$ranking timeout -k 5 90 "$fixture" run head \
    bash "$root/launch/run_multi_node.sh" -H "$work/hostfile" "$work/train.yaml" "$@" \
    --set training.train_iters=$iters --set training.eval_interval=1000 \
    --set parallel.expert_model_parallel_size=2 --set logging.run_dir="$work/$name.run" > "$log" 2>&1 &
  local job=$!
  for _ in $(seq 300); do
    kill -0 $job 2> /dev/null || fail "$name: the job ended before the kill" "$log"
    (( $(lines "$metrics") >= 5 )) && break
    sleep 0.1
  done
  local at pid
  at=$(lines "$metrics")
  (( at >= 5 )) || fail "$name: not 5 iterations within 30 s" "$log"
  pid=$(rank_pid "$h2" "$rank") || fail "$name: no rank $rank on $h2" "$log"
  kill -9 "$pid"
  local killed=$SECONDS
  local rc=0
  wait $job || rc=$?
  local took=$((SECONDS - killed)) end
  end=$(lines "$metrics")
  say "$name: rank $rank (pid $pid on $h2) killed after iteration $at of $iters ($((killed - start)) s in); the job ended $took s later, status $rc, $end iterations logged"
  # (mpirun's status is the killed rank's, 128 + 9 = 137; timeout's own 124 or 137 comes only at 90 s.)
  (( rc != 0 )) || fail "$name: status 0 after a rank was killed" "$log"
  (( took <= 30 )) || fail "$name: the job took $took s to end after the kill" "$log"
  (( end < iters )) || fail "$name: all $iters iterations logged: the kill did not land mid-training" "$log"
  python3 - "$metrics" "$key" << 'EOF' || fail "$name: metrics.jsonl" "$log"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
assert [l["iteration"] for l in lines] == list(range(1, len(lines) + 1)), "iterations not 1, 2, ..."
assert all(l[sys.argv[2]] > 0 for l in lines), f"{sys.argv[2]}: {[l[sys.argv[2]] for l in lines]}"
EOF
  local noticed
  noticed=$(grep -m1 -E "(mpirun|mpiexec) noticed that process rank $rank with PID $pid on node $h2 exited on signal 9 \(Killed\)" "$log") ||
    fail "$name: no mpirun message naming rank $rank, pid $pid and node $h2" "$log"
  say "$name: \"$noticed\""
  local ns left
  for ns in head h1 h2; do
    left=$(ip netns pids "$HOSTS_PREFIX-$ns")
    [[ -z $left ]] || fail "$name: left in $HOSTS_PREFIX-$ns after mpirun returned: $(ps -o pid=,comm= -p "${left//$'\n'/,}" | tr '\n' ' ')" "$log"
  done
}

layout ep_across_hosts node 1 time_all_to_all_s
layout pp_across_hosts slot 2 time_pipeline_wait_s --set parallel.pipeline_model_parallel_size=2 --set model.num_layers=4 \
  --set model.moe_router_load_balancing_type=aux_loss

# The fixture's teardown leaves nothing behind.
"$fixture" down
[[ -z $(ip netns list | awk '{print $1}' | grep "^$HOSTS_PREFIX-" || true) ]] || fail "namespaces left after the teardown" /dev/null
[[ -z $(pgrep -f "$work" || true) ]] || fail "processes left after the teardown: $(pgrep -af "$work")" /dev/null
[[ -z $(compgen -G "${TMPDIR:-/tmp}/ompi.$HOSTS_PREFIX-*" || true) ]] || fail "Open MPI session directories left" /dev/null
say "teardown: no namespace, process or session directory left; passed"
