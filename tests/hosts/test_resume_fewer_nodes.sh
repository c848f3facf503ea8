#!/usr/bin/env bash
# ctest "resume on fewer nodes": a sharded checkpoint saved across two test hosts at (PP 2, TP 1,
# DP 2, EP 2, world 4) (launch/run_multi_node.sh, 2 ranks a host, the stages on different hosts),
# resumed by --load at (1, 1, 2, 1, 2) on one host (run_multi_node.sh with a one-host hostfile):
# resharded on load (it says so), its third iteration equals the single-process run's and the same
# checkpoint continued on its own layout across both hosts (tests/hosts/check_run.py, relative 1e-5).
# Its environment.json names mpirun as the launcher, not Open MPI's daemon on h1 (rank 0's parent).
# Exits 77 (skipped) where namespaces cannot be made. docs/test_hosts.md.
#   bash tests/hosts/test_resume_fewer_nodes.sh MOEFORGE_BINARY
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=hosts_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/hosts_common.sh"
hosts_begin "${1:?usage: test_resume_fewer_nodes.sh MOEFORGE_BINARY}"
hosts_write_config
hosts_mpi_env
grep "^$h1 " "$work/hostfile" > "$work/hostfile.one"

# Pipeline stages: per-layer load balancing and 4 layers (tests/unit/train_fixture.h kPipelineModel).
# The schedule must not depend on train_iters: the saving run stops at 2, the others at 3.
model=(--set model.num_layers=4 --set model.moe_router_load_balancing_type=aux_loss --set training.eval_iters=0
       --set training.lr_decay_iters=30)
pp2=(--set parallel.pipeline_model_parallel_size=2 --set parallel.expert_model_parallel_size=2
     --set parallel.use_distributed_optimizer=true)

"$bin" train "$work/train.yaml" "${model[@]}" --set training.train_iters=3 --set "logging.run_dir=$work/single" \
  > "$work/single.log" 2>&1 || fail "the single-process run" "$work/single.log"

# hosts NAME HOSTFILE [train arguments]: the job from the head onto the hosts of HOSTFILE, ranks by slot.
hosts() {
  local name=$1 hostfile=$2
  shift 2
  local start=$SECONDS
  OMPI_MCA_rmaps_base_ranking_policy=slot timeout 120 "$fixture" run head \
    bash "$root/launch/run_multi_node.sh" -H "$hostfile" "$work/train.yaml" "${model[@]}" "$@" \
    --set "logging.run_dir=$work/$name" --set "checkpoint.save=$work/$name.ckpt" > "$work/$name.log" 2>&1 ||
    fail "run_multi_node.sh ($name)" "$work/$name.log"
  say "$name: $((SECONDS - start)) s"
}

hosts saved "$work/hostfile" "${pp2[@]}" --set checkpoint.format=sharded --set training.train_iters=2
ckpt=$work/saved.ckpt/iter_0000002
[[ -f $ckpt/shards.json && -f $ckpt/mp_rank_00_001_001/model.safetensors ]] ||
  fail "no PP 2 x EP 2 shards in $ckpt" "$work/saved.log"
hosts same "$work/hostfile" "${pp2[@]}" --set training.train_iters=3 --load "$work/saved.ckpt"
hosts fewer "$work/hostfile.one" --set parallel.use_distributed_optimizer=true --set training.train_iters=3 \
  --load "$work/saved.ckpt"
grep -q "resharded $ckpt on load from PP 2 x EP 2, layers per stage \[2, 2\] to PP 1 x EP 1, layers per stage \[4\]" \
  "$work/fewer.log" || fail "the resumed run did not say it resharded the checkpoint" "$work/fewer.log"

python3 "$here/check_run.py" "$root" "$work/single" "$work/fewer" --from-iteration 3 --layers 4 --pp 1 --dp 2 --ep 1 \
  --hostnames "$h1,$h1" || fail "the resumed run against the single process" "$work/fewer.log"
python3 "$here/check_run.py" "$root" "$work/same" "$work/fewer" --from-iteration 3 --layers 4 --pp 1 --dp 2 --ep 1 \
  --hostnames "$h1,$h1" || fail "the resumed run against continuing on the saved layout" "$work/fewer.log"
python3 "$here/check_run.py" "$root" "$work/single" "$work/same" --from-iteration 3 --layers 4 --pp 2 --dp 2 --ep 2 \
  --hostnames "$h1,$h1,$h2,$h2" || fail "continuing on the saved layout against the single process" "$work/same.log"
# Rank 0 runs under Open MPI's daemon on h1, mpirun on the head: environment.json names mpirun.
python3 - "$work/fewer/environment.json" << 'PY' || fail "environment.json's launcher" "$work/fewer.log"
import json, re, sys
env = json.load(open(sys.argv[1]))
assert re.fullmatch(r"mpirun( on \S+)? \(remote daemon (orted|prted)\)", env["launcher"]), env["launcher"]
assert "orted" in env["launcher_daemon"] or "prted" in env["launcher_daemon"], env["launcher_daemon"]
print("launcher:", env["launcher"])
PY
say "passed"
