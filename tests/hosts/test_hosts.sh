#!/usr/bin/env bash
# Test hosts on one machine: N "hosts" and a head node made of Linux network namespaces, each with
# its own address on a private bridge and its own hostname, for running mpirun across "nodes" in CI
# (docs/test_hosts.md). Root only; skips (exit 77) where namespaces cannot be made.
#
#   test_hosts.sh up N          make hosts h1..hN and the head (prints the names)
#   test_hosts.sh down          remove them: processes inside are killed, namespaces deleted
#   test_hosts.sh run HOST CMD...   run CMD on HOST (head, h1.., or a full hostname)
#   test_hosts.sh rsh HOST CMD...   Open MPI's remote agent (plm_rsh_agent): CMD as ssh runs it
#   test_hosts.sh hostfile SLOTS    an Open MPI hostfile for the hosts, "HOST slots=SLOTS" lines
#   test_hosts.sh mpi-env           the OMPI_MCA_* settings for mpirun on the head (export lines)
#   test_hosts.sh gc            remove fixtures whose owning process is gone (a killed test's)
#
# A fixture is named by HOSTS_PREFIX (letters and digits; default mfh<PID of the caller>): the
# namespaces are PREFIX-hub (the bridge), PREFIX-head and PREFIX-h1..N, and each host's hostname
# is its namespace's name, so two fixtures (ctest -j2) never share a name. Environment:
#   HOSTS_PREFIX   the fixture's name, e.g. mfh$$ in the test that owns it
#   HOSTS_SUBNET   the first three octets of the fixture's /24 (default 10.231.0): head .1, hN .(10+N)
# Isolation: the namespaces are linked only to each other (veth pairs to a bridge in the hub); no
# interface is added to the root namespace and no host has a default route.
set -euo pipefail

self=$(readlink -f "${BASH_SOURCE[0]}")
prefix=${HOSTS_PREFIX:-mfh$PPID}
subnet=${HOSTS_SUBNET:-10.231.0}
iface=hnet0  # every host's interface on the fixture network (like eth0 on a cluster)
if [[ ! $prefix =~ ^[a-z][a-z0-9]{0,19}$ ]]; then
  echo "test_hosts: HOSTS_PREFIX '$prefix': expected a letter then up to 19 letters or digits" >&2
  exit 2
fi

skip() {
  echo "SKIP (test hosts): $*" >&2
  exit 77
}

# The fixture's namespaces (hub last, so it goes after the hosts that link to it).
members() {
  ip netns list 2> /dev/null | awk '{print $1}' | grep -E "^${prefix}-(head|h[0-9]+)$" || true
  ip netns list 2> /dev/null | awk '{print $1}' | grep -Fx "${prefix}-hub" || true
}

# (grep without -q: under pipefail an early exit would fail `ip netns list` with SIGPIPE.)
ns_exists() { ip netns list 2> /dev/null | awk '{print $1}' | grep -Fx "$1" > /dev/null; }

# head, h1, mfh123-h1 -> mfh123-h1
ns_of() {
  case $1 in
    "${prefix}"-*) echo "$1" ;;
    *) echo "${prefix}-$1" ;;
  esac
}

down() {
  local ns pids
  for ns in $(members); do
    # Everything started in the namespace (ranks, orted, a stuck agent): gone before the namespace.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(ip netns pids "$ns" 2> /dev/null || true)
      [[ -z $pids ]] && break
      # shellcheck disable=SC2086  # a list of PIDs
      kill -9 $pids 2> /dev/null || true
      sleep 0.1
    done
    [[ -n $pids ]] && echo "test_hosts: processes $pids survive in $ns" >&2
    ip netns del "$ns" 2> /dev/null || echo "test_hosts: could not delete namespace $ns" >&2
  done
  # Open MPI's session directories are named after the host (ompi.HOST.UID under TMPDIR).
  rm -rf "${TMPDIR:-/tmp}"/ompi."${prefix}"-* 2> /dev/null || true
  return 0
}

up() {
  local n=$1 i ns err
  [[ $n =~ ^[1-9][0-9]?$ ]] || { echo "test_hosts: up N: N from 1 to 99 (got '$n')" >&2; exit 2; }
  [[ $EUID -eq 0 ]] || skip "network namespaces need root (running as uid $EUID)"
  command -v ip > /dev/null || skip "no 'ip' (iproute2)"
  command -v unshare > /dev/null || skip "no 'unshare' (util-linux)"
  err=$(unshare --uts true 2>&1) || skip "unshare --uts failed: $err"
  gc
  [[ -z $(members) ]] || { echo "test_hosts: a fixture named $prefix exists already: test_hosts.sh down first" >&2; exit 1; }
  if ip -4 addr show 2> /dev/null | grep >/dev/null "inet ${subnet//./\\.}\." || ip -4 route show 2> /dev/null | grep >/dev/null "^${subnet//./\\.}\."; then
    # Harmless (nothing here reaches the root namespace) but confusing in a log: say so.
    echo "test_hosts: note: $subnet.0/24 is also in use in the root namespace; the fixture's copy is separate" >&2
  fi
  trap 'down; exit 1' ERR
  # The first namespace tells whether this machine allows any (a container without CAP_SYS_ADMIN).
  err=$(ip netns add "${prefix}-hub" 2>&1) || skip "ip netns add failed: $err"
  err=$(ip -n "${prefix}-hub" link add br0 type bridge 2>&1) || { down; skip "no bridge device: $err"; }
  ip -n "${prefix}-hub" link set lo up
  ip -n "${prefix}-hub" link set br0 up
  local names=(head) addrs=(1)
  for ((i = 1; i <= n; i++)); do names+=("h$i"); addrs+=($((10 + i))); done
  for i in "${!names[@]}"; do
    ns="${prefix}-${names[$i]}"
    ip netns add "$ns"
    # The pair is made in the hub and its other end moved straight into the host: nothing in the
    # root namespace at any time.
    err=$(ip -n "${prefix}-hub" link add "v-${names[$i]}" type veth peer name "$iface" netns "$ns" 2>&1) ||
      { down; skip "no veth device: $err"; }
    ip -n "${prefix}-hub" link set "v-${names[$i]}" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$subnet.${addrs[$i]}/24" dev "$iface"
    ip -n "$ns" link set "$iface" up
  done
  trap - ERR
  for i in "${!names[@]}"; do echo "${prefix}-${names[$i]} $subnet.${addrs[$i]}"; done
}

# Fixtures whose owner (the PID in the default name mfh<PID>) is gone: a test killed by a timeout.
gc() {
  local ns owner
  for ns in $(ip netns list 2> /dev/null | awk '{print $1}' | grep -E '^mfh[0-9]+-(hub|head|h[0-9]+)$' || true); do
    owner=${ns%%-*}
    owner=${owner#mfh}
    if ! kill -0 "$owner" 2> /dev/null; then
      HOSTS_PREFIX=mfh$owner "$self" down
    fi
  done
}

# The remote agent: ssh's contract (the arguments after the host joined into one shell command,
# run by the remote shell) with `ip netns exec` instead of a connection, in a new UTS namespace
# whose hostname is the host's.
rsh() {
  local host=$1 ns
  shift
  ns=$(ns_of "$host")
  if ! ns_exists "$ns"; then
    echo "test_hosts rsh: no test host '$host' (namespace $ns)" >&2
    exit 255  # ssh's status for a connection that failed
  fi
  # shellcheck disable=SC2016  # expanded by the inner sh
  exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "$ns" "$*"
}

run() {
  local ns
  ns=$(ns_of "$1")
  shift
  ns_exists "$ns" || { echo "test_hosts run: no test host $ns" >&2; exit 2; }
  # shellcheck disable=SC2016  # expanded by the inner sh
  exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$ns" "$@"
}

hostfile() {
  local slots=${1:?hostfile SLOTS} ns
  for ns in $(members); do
    if [[ $ns =~ -h[0-9]+$ ]]; then echo "$ns slots=$slots"; fi
  done | sort -V
}

# mpirun on the head: daemons started through this script, all by mpirun itself (no tree spawn:
# a daemon would start the next through the agent too, which works but hides failures), MPI's and
# the run-time's TCP on the fixture's subnet only, shared memory between ranks on one host.
mpi_env() {
  cat << EOF
export OMPI_MCA_plm_rsh_agent='$self rsh'
export OMPI_MCA_plm_rsh_no_tree_spawn=1
export OMPI_MCA_oob_tcp_if_include=$subnet.0/24
export OMPI_MCA_btl_tcp_if_include=$subnet.0/24
export OMPI_MCA_btl=self,vader,tcp
EOF
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
  up) up "${1:?up N}" ;;
  down) down ;;
  gc) gc ;;
  run) [[ $# -ge 2 ]] || { echo "usage: test_hosts.sh run HOST CMD..." >&2; exit 2; }; run "$@" ;;
  rsh) [[ $# -ge 2 ]] || { echo "usage: test_hosts.sh rsh HOST CMD..." >&2; exit 255; }; rsh "$@" ;;
  hostfile) hostfile "$@" ;;
  mpi-env) mpi_env ;;
  *) sed -n '2,18p' "$self" >&2; exit 2 ;;
esac
