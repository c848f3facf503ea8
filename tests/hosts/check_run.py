#!/usr/bin/env python3
"""A run across test hosts against the single-process run of the same config (test_multi_node.sh).

    check_run.py SOURCE_DIR SINGLE_RUN_DIR HOSTS_RUN_DIR --layers L --pp P --dp D --ep E
                 --hostnames h1,h2,h1,h2 [--bitwise ONE_MACHINE_RUN_DIR] [--from-iteration K]

--from-iteration K: HOSTS_RUN_DIR is a run resumed at iteration K (test_resume_fewer_nodes.sh): its
iterations K..3 against the same iterations of SINGLE_RUN_DIR (which may also start later).
The nodes and devices per node are read from --hostnames.

metrics.jsonl without the timing keys (kTimingMetricKeys of launch/train/metrics.h, read from the
source) equals the single process's: the losses and the gradient norm within relative 1e-5 (the
tolerance of tests/unit/test_train_distributed.cpp), every other key exactly, except the keys a
layout changes, which are checked against their closed forms. environment.json: 2 nodes x 2
devices, and each rank on the host given. --bitwise: the same layout under mpirun on one machine
(no namespaces) gives every non-timing key bit for bit.
"""
import argparse
import json
import re
import sys
from pathlib import Path

# Values a parallel run computes in another order: the tolerance of test_train_distributed.cpp.
TOLERANT = {"lm_loss", "aux_loss", "load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss",
            "z_loss", "loss", "grad_norm", "valid_lm_loss", "valid_ppl"}
# Keys that depend on the layout, checked on their own below.
LAYOUT = {"host_syncs", "num_micro_batches", "ep_tokens_received", "ep_tokens_received_max_over_mean",
          "all_to_all_bytes_sent"}

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
    return ok


def timing_keys(source_dir):
    text = (Path(source_dir) / "launch/train/metrics.h").read_text()
    names = dict(re.findall(r'constexpr const char\* (k\w+) = "([^"]+)"', text))
    block = re.search(r"kTimingMetricKeys\{(.*?)\};", text, re.S)
    if not block:
        sys.exit("check_run.py: kTimingMetricKeys not found in launch/train/metrics.h")
    keys = {names[k] for k in re.findall(r"metric::(k\w+)", block.group(1))}
    if len(keys) < 10:
        sys.exit(f"check_run.py: only {len(keys)} timing keys read from metrics.h: {sorted(keys)}")
    return keys


def metrics(run_dir, timing):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("source_dir")
    p.add_argument("single")
    p.add_argument("hosts")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--dp", type=int, required=True)
    p.add_argument("--ep", type=int, required=True)
    p.add_argument("--hostnames", required=True)
    p.add_argument("--bitwise")
    p.add_argument("--from-iteration", type=int, default=1)
    a = p.parse_args()
    timing = timing_keys(a.source_dir)
    single, hosts = metrics(a.single, timing), metrics(a.hosts, timing)
    single = [m for m in single if m.get("iteration", 0) >= a.from_iteration]
    n = 4 - a.from_iteration
    check(len(single) == n and len(hosts) == n and all(x.get("iteration") == y.get("iteration") for x, y in zip(single, hosts)),
          f"iterations {a.from_iteration}-3 each: {len(single)} in {a.single}, {len(hosts)} across hosts")
    worst = {}
    for one, many in zip(single, hosts):
        it = one.get("iteration")
        for key in sorted(set(one) | set(many)):
            if key in LAYOUT:
                continue
            if not check(key in one and key in many, f"iteration {it}: {key} only in one of the runs"):
                continue
            if key in TOLERANT:
                r = relative(many[key], one[key])
                worst[key] = max(worst.get(key, 0.0), r)
                check(r < 1e-5, f"iteration {it}: {key} {many[key]!r} vs {one[key]!r} (relative {r:.2e})")
            else:
                check(many[key] == one[key], f"iteration {it}: {key} {many[key]!r} vs {one[key]!r}")
        # Rank 0's host syncs: the dispatcher's counts per MoE layer of its stage and micro-batch, then 3.
        micro = 8 // (2 * a.dp)
        check(many.get("num_micro_batches") == micro, f"iteration {it}: num_micro_batches {many.get('num_micro_batches')} != {micro}")
        syncs = micro * a.layers // a.pp + 3
        check(many.get("host_syncs") == syncs, f"iteration {it}: host_syncs {many.get('host_syncs')} != {syncs}")
        if a.ep > 1:
            # Every routed slot of the global batch (8 x 32 positions x top-4) arrives at one EP rank.
            received = many.get("ep_tokens_received", [])
            check(len(received) == a.layers, f"iteration {it}: ep_tokens_received has {len(received)} layers")
            for layer in received:
                check(len(layer) == a.dp and sum(layer) == 8 * 32 * 4, f"iteration {it}: ep_tokens_received {layer}")
            check(many.get("all_to_all_bytes_sent", 0) > 0, f"iteration {it}: no all-to-all bytes")

    env = json.loads((Path(a.hosts) / "environment.json").read_text())
    expected = a.hostnames.split(",")
    nodes = len(set(expected))
    check(env.get("hostnames") == expected, f"environment.json hostnames {env.get('hostnames')} != {expected}")
    check(env.get("nodes") == nodes and env.get("devices_per_node") == len(expected) // nodes
          and env.get("world_size") == len(expected),
          f"environment.json: {env.get('nodes')} nodes x {env.get('devices_per_node')} devices, world {env.get('world_size')}")

    if a.bitwise:
        local = metrics(a.bitwise, timing)
        check(local == hosts, "across hosts and on one machine the metrics differ: "
              + "; ".join(f"iteration {m.get('iteration')}: {k} {m.get(k)!r} vs {l.get(k)!r}"
                          for m, l in zip(hosts, local) for k in sorted(set(m) | set(l)) if m.get(k) != l.get(k)))

    name = Path(a.hosts).name
    if failures:
        print(f"FAIL {name}:\n  " + "\n  ".join(failures))
        return 1
    print(f"ok {name}: iterations {a.from_iteration}-3 equal {Path(a.single).name}'s (largest relative difference "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())) + f"); ranks on {expected}"
          + ("; bit for bit as on one machine" if a.bitwise else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
