# shellcheck shell=bash
# How many ranks go where: the hosts and slots of an Open MPI hostfile, and the tasks per node of a
# SLURM allocation. Sourced by launch/mpi_common.sh (so by run_multi_node.sh and slurm.sbatch); each
# function prints one count per line, in order, or an error naming what to fix and returns 2.
# docs/launching.md describes the rules; tests/unit/test_launch_scripts.cpp checks them.
#
#   moeforge_hostfile_slots HOSTFILE   prints "HOST SLOTS" per host, in the order of first mention
#   moeforge_slurm_tasks_per_node      prints the tasks of each node of the allocation, expanded
#                                      from SLURM_TASKS_PER_NODE ("8(x4)", "2(x3),1")

# Open MPI's hostfile grammar (orte/util/hostfile in 4.1, prrte's hostfile in 5.x), as mpirun
# counts slots:
#  - "#" and "//" comment to the end of the line, "/* ... */" spans lines; blank lines are skipped;
#    "key=value" may have blanks around the "=";
#  - a host's first line gives it 1 slot; "slots=N" (also "count=N", "cpu=N") sets N;
#  - "max_slots=M" (also max-slots, slots_max, slots-max and the cpu/count variants) is a cap, never
#    slots; on a line without slots=, the host gets M slots; M below the slots is an error;
#  - a host on several lines gets one more slot for each further line; a slot count given twice
#    (slots= on two lines of one host, or slots= on a repeated line) is refused, as mpirun refuses it;
#  - "username=" and "port=" are read and ignored; any other "key=value" is refused (mpirun refuses
#    it too, e.g. the singular "slot=8"); a bare word after the host is ignored, as by mpirun;
#  - "user@host" is host; a name's domain is dropped ("node01.cluster" is node01; addresses stay
#    whole); "^host" excludes that host.
# Where mpirun asks the node: a host that never gets a count (one bare line) is listed with 1 slot
# here, and a note says mpirun itself would give it one slot per core (orte_set_default_slots).
moeforge_hostfile_slots() {
  local hostfile=$1
  if [[ ! -f $hostfile || ! -r $hostfile ]]; then
    echo "error: hostfile '$hostfile' does not exist or is not readable; write one 'host slots=N' line per node" >&2
    return 2
  fi
  awk -v file="$hostfile" '
    function fail(msg) {
      printf "error: %s line %d: %s\n", file, FNR, msg > "/dev/stderr"
      failed = 1
      exit 2
    }
    function is_address(name) { return name ~ /^[0-9.]+$/ || name ~ /:/ }
    function node_name(entry,    at) {
      at = index(entry, "@")
      if (at > 0) entry = substr(entry, at + 1)
      if (!is_address(entry)) sub(/\..*/, "", entry)
      return entry
    }
    function count_of(key, value) {
      if (value == "") fail("\"" key "=\" has no value: write e.g. \"" host " " key "=8\"")
      if (value !~ /^[0-9]+$/) fail("\"" key "=" value "\" is not a whole number of slots: write e.g. \"" host " " key "=8\"")
      return value + 0
    }
    BEGIN {
      slot_keys["slots"] = slot_keys["count"] = slot_keys["cpu"] = 1
      split("max_slots max-slots slots_max slots-max cpu_max cpu-max max_cpu max-cpu count_max count-max max_count max-count", m, " ")
      for (i in m) max_keys[m[i]] = 1
      # the other keywords mpirun accepts; they say nothing about slots
      split("username user-name user_name port", o, " ")
      for (i in o) other_keys[o[i]] = 1
      in_block = 0
    }
    {
      line = $0
      gsub(/[\r\f\v]/, " ", line)
      # comments: a "/* */" block (possibly open from an earlier line), then "#" and "//" to the end
      text = ""
      while (line != "") {
        if (in_block) {
          end = index(line, "*/")
          if (end == 0) { line = ""; break }
          line = substr(line, end + 2); in_block = 0
        } else {
          start = index(line, "/*")
          if (start == 0) { text = text line; line = ""; break }
          text = text substr(line, 1, start - 1) " "; line = substr(line, start + 2); in_block = 1
        }
      }
      sub(/#.*/, "", text)
      sub(/\/\/.*/, "", text)
      gsub(/[ \t]*=[ \t]*/, "=", text)
      n = split(text, f, /[ \t]+/)
      first = 1
      while (first <= n && f[first] == "") first++
      if (first > n) next
      entry = f[first]
      if (entry ~ /=/) fail("\"" entry "\" comes before any host name: write \"HOST " entry "\"")
      if (entry == "rank") fail("a rankfile line (\"rank N=host\"): give a hostfile, one \"host slots=N\" line per node")
      if (entry ~ /^\+/) fail("relative node syntax (\"" entry "\") needs a resource manager allocation: name the host")
      if (entry ~ /^\^/) { excluded[node_name(substr(entry, 2))] = 1; next }
      host = node_name(entry)
      if (!(host in slots)) {
        order[++hosts] = host; slots[host] = 1; given[host] = 0; max[host] = 0; where[host] = FNR
      } else {
        slots[host]++; given[host] = 1
      }
      got_max = 0
      for (i = first + 1; i <= n; i++) {
        if (f[i] == "") continue
        eq = index(f[i], "=")
        if (eq == 0) {
          if (f[i] in slot_keys || f[i] in max_keys) fail("\"" f[i] "\" has no value: write e.g. \"" host " " f[i] "=8\"")
          continue  # a bare word: mpirun ignores it too
        }
        key = substr(f[i], 1, eq - 1); value = substr(f[i], eq + 1)
        if (key in slot_keys) {
          c = count_of(key, value)
          if (given[host]) fail("a second slot count for " host " (first listed on line " where[host] "): Open MPI refuses it; give one \"" host " slots=N\" line, or list the host once per slot")
          slots[host] = c; given[host] = 1
          if (max[host] != 0 && max[host] < c) max[host] = c
        } else if (key in max_keys) {
          c = count_of(key, value)
          if (c < slots[host]) fail("\"" key "=" c "\" is below the " slots[host] " slots of " host ": max_slots caps slots, it must be at least slots")
          if (max[host] != c) { max[host] = c; got_max = 1 }
        } else if (!(key in other_keys)) {
          fail("unknown keyword \"" key "\" (Open MPI: slots, count, cpu, max_slots, max-slots, username, port, ...): write e.g. \"" host " slots=8\"")
        }
      }
      if (got_max && !given[host]) { slots[host] = max[host]; given[host] = 1 }
    }
    END {
      if (failed) exit 2
      listed = 0
      for (i = 1; i <= hosts; i++) {
        h = order[i]
        if (h in excluded) continue
        listed++
        if (!given[h]) printf "note: %s line %d: %s gives no slots=: counted as 1 slot (mpirun would give it one per CPU core); write \"%s slots=N\" with N its GPUs\n", file, where[h], h, h > "/dev/stderr"
        print h, slots[h]
      }
      if (listed == 0) {
        printf "error: %s lists no hosts: write one \"host slots=N\" line per node\n", file > "/dev/stderr"
        exit 2
      }
    }
  ' "$hostfile"
}

# SLURM_TASKS_PER_NODE, which sbatch and salloc always set: comma-separated counts in the order of
# SLURM_JOB_NODELIST, "N(xK)" standing for K nodes of N tasks each ("2(x3),1" is 2, 2, 2, 1).
# Checked against SLURM_JOB_NUM_NODES (the nodes) and SLURM_NTASKS (the sum) where those are set.
moeforge_slurm_tasks_per_node() {
  local compressed=${SLURM_TASKS_PER_NODE:-}
  if [[ -z $compressed ]]; then
    echo "error: SLURM_TASKS_PER_NODE is not set: run inside a SLURM allocation (sbatch or salloc)" >&2
    return 2
  fi
  local -a counts=() items=()
  local item n k i
  IFS=, read -ra items <<< "$compressed"
  for item in "${items[@]}"; do
    if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      n=$((10#${BASH_REMATCH[1]})) k=$((10#${BASH_REMATCH[2]}))
    elif [[ $item =~ ^([0-9]+)$ ]]; then
      n=$((10#${BASH_REMATCH[1]})) k=1
    else
      echo "error: SLURM_TASKS_PER_NODE='$compressed': '$item' is neither N nor N(xK)" >&2
      return 2
    fi
    for ((i = 0; i < k; i++)); do counts+=("$n"); done
  done
  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
  if [[ -n $nodes && $nodes != "${#counts[@]}" ]]; then
    echo "error: SLURM_TASKS_PER_NODE='$compressed' names ${#counts[@]} nodes, SLURM_JOB_NUM_NODES=$nodes" >&2
    return 2
  fi
  local sum=0
  for n in "${counts[@]}"; do sum=$((sum + n)); done
  if [[ -n ${SLURM_NTASKS:-} && $SLURM_NTASKS != "$sum" ]]; then
    echo "error: SLURM_TASKS_PER_NODE='$compressed' sums to $sum tasks, SLURM_NTASKS=$SLURM_NTASKS" >&2
    return 2
  fi
  printf '%s\n' "${counts[@]}"
}
