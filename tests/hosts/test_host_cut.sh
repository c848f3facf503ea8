#!/usr/bin/env bash
# ctest "a test host cut off mid-step": launch/run_multi_node.sh on two test hosts x 2 ranks (the EP
# layout of test_multi_node.sh: PP 1, DP 4, EP 2, ranks by node, so every EP all-to-all and the DP
# all-reduce cross the hosts), checkpoints every 10 of 100 iterations, parallel.distributed_timeout_minutes
# and checkpoint.save_timeout_minutes 0.1 (6 s). Mid-training, host 2's link goes down (its veth
# end in the hub: a cable pulled; its processes live on, cut off). Asserted:
#   - the ranks on host 1 print moeforge's watchdog message naming the rank, its host, the collective
#     and its group's world ranks, the first 5 to 14 s after the cut, and their processes are gone
#     within 16 s of the cut (whether the group includes a rank of host 2 is printed, not asserted:
#     a rank waiting on a stuck peer of its own host names that group, and the lost host is not named);
#   - host 2's Open MPI daemon is still there then (it cannot hear the abort) and mpirun waits for
#     it: the link comes back up, and mpirun then ends by itself within 30 s, non-zero, with nothing
#     left in any namespace;
#   - the last checkpoint (the tracker's iter_N) is intact: relaunched from the head, the dry run
#     refuses (the dead run's lock names host 1, which the head cannot check); relaunched from host 1
#     (rank 0's), the job resumes from iteration N + 1 to the end, exits 0, and metrics.jsonl holds
#     every iteration once.
# Everything is bounded (timeout). docs/test_hosts.md. Exits 77 (skipped) without namespaces.
#   bash tests/hosts/test_host_cut.sh MOEFORGE_BINARY
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=hosts_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/hosts_common.sh"
hosts_begin "${1:?usage: test_host_cut.sh MOEFORGE_BINARY}"
hosts_write_config
hosts_mpi_env
iters=100

train() {  # LOG SECONDS [LAUNCH_HOST]: the job on the hosts, bounded, mpirun on the head or a host
  OMPI_MCA_rmaps_base_ranking_policy=node timeout -k 5 "$2" "$fixture" run "${3:-head}" \
    bash "$root/launch/run_multi_node.sh" -H "$work/hostfile" "$work/train.yaml" \
    --set training.train_iters=$iters --set training.eval_interval=1000 \
    --set parallel.expert_model_parallel_size=2 --set parallel.distributed_timeout_minutes=0.1 \
    --set checkpoint.save="$work/ckpt" --set checkpoint.save_interval=10 --set checkpoint.save_timeout_minutes=0.1 \
    --set logging.run_dir="$work/run" > "$1" 2>&1
}

start=$SECONDS
train "$work/cut.log" 90 &
job=$!
# Mid-training: a checkpoint behind, two iterations past it (the next save 8 iterations on; should the
# cut land in one, checkpoint.save_timeout_minutes bounds the wait for it as the distributed timeout
# bounds every communication).
ready=""
for _ in $(seq 300); do
  kill -0 $job 2> /dev/null || fail "the job ended before the cut" "$work/cut.log"
  if [[ -s $work/ckpt/latest_checkpointed_iteration.txt && -s $work/run/metrics.jsonl ]]; then
    ckpt=$(cat "$work/ckpt/latest_checkpointed_iteration.txt")
    if (( $(wc -l < "$work/run/metrics.jsonl") >= ckpt + 2 )); then ready=1; break; fi
  fi
  sleep 0.1
done
[[ -n $ready ]] || fail "no checkpoint and 2 iterations past it within 30 s" "$work/cut.log"
ip -n "$hub" link set v-h2 down
cut_at=$(date +%s.%N)
logged=$(wc -l < "$work/run/metrics.jsonl")
say "started $((SECONDS - start)) s ago; $h2 cut off after iteration $logged of $iters (checkpoint $ckpt)"

since() { python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.1f}')" "$(date +%s.%N)" "$1"; }
on_host() {  # the PIDs of NAME on HOST
  local pid
  for pid in $(ip netns pids "$1"); do
    [[ $(cat "/proc/$pid/comm" 2> /dev/null) == "$2" ]] && echo "$pid"
  done
  return 0
}
message_at="" gone_at=""
for _ in $(seq 160); do
  if [[ -z $message_at ]] && grep -q "^error: rank [0-9]* (host $h1, .* did not complete within" "$work/cut.log"; then
    message_at=$(since "$cut_at")
  fi
  if [[ -n $message_at && -z $(on_host "$h1" moeforge) ]]; then gone_at=$(since "$cut_at"); break; fi
  sleep 0.1
done
[[ -n $message_at ]] || fail "no watchdog message from $h1's ranks within 16 s of the cut" "$work/cut.log"
[[ -n $gone_at ]] || fail "$h1's ranks still run 16 s after the cut" "$work/cut.log"
say "watchdog message on $h1 ${message_at} s after the cut; its ranks gone ${gone_at} s after it"
python3 - "$work/cut.log" "$h1" "$message_at" << 'EOF' || fail "the surviving ranks' messages" "$work/cut.log"
import re, sys
log, host, at = open(sys.argv[1]).read(), sys.argv[2], float(sys.argv[3])
pattern = (r"^error: rank (\d+) \(host " + re.escape(host) + r", pid \d+\): (.+?) on group (\w+) \(world ranks \[([\d, ]+)\]\)"
           r" did not complete within 6\.0 s \((?:parallel\.distributed|checkpoint\.save)_timeout_minutes\): a peer rank is hung or has died"
           r"(?:; waiting for .+?)?\. Ending the job\.$")  # the flight recorder's peers and hosts, docs/hang.md
found = re.findall(pattern, log, re.M)
assert found, f"no watchdog message of {host}'s ranks"
for rank, op, group, ranks in found:
    ranks = [int(r) for r in ranks.split(",")]
    assert int(rank) % 2 == 0 and int(rank) in ranks, f"rank {rank} is not on {host} (ranks by node: 0, 2) or not in {ranks}"
    # Not asserted: that the group reaches the cut host. A rank waiting on a surviving peer that is
    # itself stuck (rank 2 in the expert-DP all-reduce with rank 0, both on host 1) names that group,
    # and the abort that follows the first message often ends the other rank before its own.
    lost = [r for r in ranks if r % 2]
    print(f"ok: rank {rank} on {host}: {op} on group {group} (world ranks {ranks}) timed out; "
          + (f"the group includes rank(s) {lost} of the cut host" if lost else f"a group within {host}: the lost host is not named"))
print(f"ok: the first message {at} s after the cut")
assert 5.0 <= at <= 14.0, f"the first message came {at} s after the cut, not the 6 s timeout (+ up to 8 s)"
EOF

# The cut host's daemon lives on (its ranks end on their own watchdog): mpirun cannot reach it with
# the abort, and waits.
lingering=$(on_host "$h2" orted)
[[ -n $lingering ]] || fail "$h2's daemon is gone although cut off" "$work/cut.log"
kill -0 $job 2> /dev/null || fail "mpirun ended with $h2 unreachable (expected it to wait for the daemon)" "$work/cut.log"
say "$h2 still runs orted ($lingering) and $(on_host "$h2" moeforge | wc -l) ranks; mpirun waits for it"
ip -n "$hub" link set v-h2 up
up_at=$(date +%s.%N)
rc=0
wait $job || rc=$?
ended=$(since "$up_at")
say "link back up: mpirun ended ${ended} s later with status $rc, $(since "$cut_at") s after the cut"
# (Within 30 s of the link, so well inside the job's 90 s timeout: the status is mpirun's.)
python3 -c "import sys; sys.exit(float(sys.argv[1]) > 30)" "$ended" || fail "mpirun took ${ended} s after the link came back" "$work/cut.log"
(( rc != 0 )) || fail "mpirun's status 0 after the abort" "$work/cut.log"
for ns in head h1 h2; do
  left=$(ip netns pids "$HOSTS_PREFIX-$ns")
  [[ -z $left ]] || fail "processes left in $HOSTS_PREFIX-$ns: $(ps -o pid=,comm= -p "${left//$'\n'/,}" | tr '\n' ' ')" "$work/cut.log"
done

# The last checkpoint resumes on the hosts and training goes on to the end.
ckpt=$(cat "$work/ckpt/latest_checkpointed_iteration.txt")
[[ -d $work/ckpt/iter_$(printf %07d "$ckpt") ]] || fail "the tracker names $ckpt, whose directory is missing" "$work/cut.log"
(( ckpt >= 10 && ckpt < iters )) || fail "checkpoint $ckpt after the cut" "$work/cut.log"
# From the head, run_multi_node.sh's dry run refuses: rank 0's lock in the run and save directories
# names host 1, which the head cannot check (a lock from another host is never taken over).
rc=0
train "$work/refused.log" 60 || rc=$?
if (( rc != 1 )) || ! grep -q "^error: the dry run for world size 4 failed (above); nothing was launched" "$work/refused.log"; then
  fail "the restart from the head: status $rc (expected the dry run's refusal)" "$work/refused.log"
fi
grep -q "^  PROBLEM  checkpoint.save: checkpoint.save $work/ckpt is locked by pid [0-9]* on host $h1 .*: a run on another host, which this host cannot check" "$work/refused.log" ||
  fail "the dry run on the head did not name $h1's lock" "$work/refused.log"
say "a restart from the head is refused by its dry run: the save directory's lock names $h1"
# From host 1 (rank 0's, as the first node of an allocation): the dead run's lock is taken over.
start=$SECONDS
train "$work/resume.log" 90 h1 || fail "the resumed job" "$work/resume.log"
say "resumed from checkpoint $ckpt, launched on $h1: $((SECONDS - start)) s, exit 0"
grep -q "\[warning\] taking over the stale lock $work/ckpt/moeforge.lock of pid [0-9]* on host $h1 .*: that process no longer holds it" "$work/resume.log" ||
  fail "the resumed job did not take over the dead run's lock" "$work/resume.log"
grep -q "\[info\] resumed from $work/ckpt/iter_$(printf %07d "$ckpt") (the latest in checkpoint.save) at iteration $ckpt " "$work/resume.log" ||
  fail "the resumed job did not say it resumed from iteration $ckpt" "$work/resume.log"
first=$(grep -m1 -o "iteration *[0-9]*/ *$iters" "$work/resume.log" | awk '{print $2}' | cut -d/ -f1)
[[ $first == $((ckpt + 1)) ]] || fail "the resumed job's first iteration is $first, not $((ckpt + 1))" "$work/resume.log"
python3 - "$work/run/metrics.jsonl" "$iters" << 'EOF' || fail "metrics.jsonl after the resume" "$work/resume.log"
import json, sys
its = [json.loads(l)["iteration"] for l in open(sys.argv[1])]
assert its == list(range(1, int(sys.argv[2]) + 1)), f"iterations {its}"
EOF
[[ -z $(find "$work/ckpt" "$work/run" -name '*.tmp-*') ]] || fail "temporaries left: $(find "$work/ckpt" "$work/run" -name '*.tmp-*')" "$work/resume.log"
say "passed"
