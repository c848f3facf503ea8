#!/usr/bin/env bash
# ctest "multi-node training on two test hosts": launch/run_multi_node.sh from a head node onto two
# hosts of tests/hosts/test_hosts.sh (network namespaces: own address, own hostname) with 2 ranks
# each, in two layouts whose groups cross the hosts:
#   EP: PP 1 x TP 1 x DP 4, EP 2, ranks by node (0, 2 on host 1; 1, 3 on host 2): each EP group's
#       all-to-all crosses the hosts
#   PP: PP 2 x TP 1 x DP 2, EP 2, ranks by slot (0, 1 on host 1; 2, 3 on host 2): the two
#       pipeline stages are on different hosts
# Each equals the single-process run of its config (tests/hosts/check_run.py) and the same layout
# under mpirun on one machine bit for bit. Exits 77 (skipped) where namespaces cannot be made.
#   bash tests/hosts/test_multi_node.sh MOEFORGE_BINARY
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=hosts_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/hosts_common.sh"
hosts_begin "${1:?usage: test_multi_node.sh MOEFORGE_BINARY}"

# The network: h1 reaches h2 over the fixture's bridge, and nothing outside it (no default route).
"$fixture" run h2 python3 -c '
import socket, sys
s = socket.socket(); s.bind(("10.231.0.12", 0)); s.listen(1)
print(s.getsockname()[1], flush=True); sys.stdout.close()
c, _ = s.accept(); c.sendall(socket.gethostname().encode())' > "$work/port" &
listener=$!
for _ in $(seq 50); do [[ -s $work/port ]] && break; sleep 0.1; done
"$fixture" run h1 python3 -c '
import errno, socket, sys
port = int(sys.argv[1])
peer = socket.create_connection(("10.231.0.12", port), timeout=5).recv(100).decode()
assert peer == sys.argv[2], f"h2 says it is {peer!r}"
for outside in ["192.0.2.1", "10.0.0.1", "8.8.8.8"]:
    try:
        socket.create_connection((outside, 53), timeout=2)
        sys.exit(f"{outside} reachable from a test host")
    except OSError as e:
        assert e.errno == errno.ENETUNREACH, f"{outside}: {e}"
print(f"{socket.gethostname()} -> {peer} over TCP; nothing outside the fixture reachable")' "$(head -n1 "$work/port")" "$h2"
wait $listener
[[ -z $(ip -n "$h1" route show default) ]] || { echo "FAIL: $h1 has a default route" >&2; exit 1; }

hosts_write_config
hosts_mpi_env

tx_bytes() { ip -n "$1" -s -j link show hnet0 | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["stats64"]["tx"]["bytes"])'; }

# layout NAME RANKING PP EP LAYERS HOSTNAMES [train arguments]
layout() {
  local name=$1 ranking=$2 pp=$3 ep=$4 layers=$5 hostnames=$6
  shift 6
  local args=(--set "model.num_layers=$layers" "$@" --set training.train_iters=3)
  local par=(--set "parallel.pipeline_model_parallel_size=$pp" --set "parallel.expert_model_parallel_size=$ep")
  "$bin" train "$work/train.yaml" "${args[@]}" --set "logging.run_dir=$work/$name.single" > "$work/$name.single.log" 2>&1 ||
    fail "the single-process run of $name" "$work/$name.single.log"
  local before
  before=$(tx_bytes "$h1")
  local start=$SECONDS
  OMPI_MCA_rmaps_base_ranking_policy=$ranking timeout 120 "$fixture" run head \
    bash "$root/launch/run_multi_node.sh" -H "$work/hostfile" "$work/train.yaml" "${args[@]}" "${par[@]}" \
    --set "logging.run_dir=$work/$name.hosts" > "$work/$name.hosts.log" 2>&1 ||
    fail "run_multi_node.sh on the test hosts ($name)" "$work/$name.hosts.log"
  say "$name across 2 hosts x 2 ranks: $((SECONDS - start)) s, $(( ($(tx_bytes "$h1") - before) / 1024 )) KiB sent by $h1 on the fixture network"
  # The same layout on one machine, without namespaces, for the bitwise comparison.
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
    env -u OMPI_MCA_plm_rsh_agent -u OMPI_MCA_oob_tcp_if_include -u OMPI_MCA_btl_tcp_if_include \
    timeout 120 "${MOEFORGE_MPIRUN:-mpirun}" --oversubscribe --bind-to none -np 4 "$bin" train "$work/train.yaml" "${args[@]}" "${par[@]}" \
    --set "logging.run_dir=$work/$name.local" > "$work/$name.local.log" 2>&1 ||
    fail "mpirun -np 4 on this machine ($name)" "$work/$name.local.log"
  grep -q "^dry run for world size 4 passed" "$work/$name.hosts.log" ||
    fail "run_multi_node.sh did not report its dry run ($name)" "$work/$name.hosts.log"
  python3 "$here/check_run.py" "$root" "$work/$name.single" "$work/$name.hosts" --layers "$layers" --pp "$pp" \
    --dp $((4 / pp)) --ep "$ep" --hostnames "$hostnames" --bitwise "$work/$name.local"
}

layout ep_across_hosts node 1 2 2 "$h1,$h2,$h1,$h2"
# Pipeline stages: per-layer load balancing and 4 layers (tests/unit/train_fixture.h kPipelineModel).
layout pp_across_hosts slot 2 2 4 "$h1,$h1,$h2,$h2" --set model.moe_router_load_balancing_type=aux_loss
say "passed"
