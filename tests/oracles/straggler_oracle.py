"""Test oracle for the straggler cost of `moeforge report NATURAL FORCED` (docs/report.md), recomputed
with numpy from the two runs' metrics.jsonl alone:

  straggler_oracle.py NATURAL_METRICS FORCED_METRICS OUT.json

The steady state leaves out the report's default warm-up (0 for <= 2 iterations, else
min(10, max(1, n // 10))). Per steady step of the natural run, the spread of the ranks' compute
before the all-to-alls is max - mean of rank_times.compute_before_all_to_all_s over the ranks (one
EP group: the test's layout is DP2 x EP2 on two ranks). Writes {"natural_step_time_s",
"forced_step_time_s", "straggler_cost_s", "ep_wait_s", "rest_s", "steps"}. Used only by tests.
"""
import json
import sys

import numpy as np


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def warmup(n):
    return 0 if n <= 2 else min(10, max(1, n // 10))


def main(natural_path, forced_path, out_path):
    natural, forced = load(natural_path), load(forced_path)
    steady_n, steady_f = natural[warmup(len(natural)):], forced[warmup(len(forced)):]
    t_nat = float(np.median([m["step_time_s"] for m in steady_n]))
    t_frc = float(np.median([m["step_time_s"] for m in steady_f]))
    spreads = []
    for m in steady_n:
        c = np.array(m["rank_times"]["compute_before_all_to_all_s"], dtype=np.float64)
        spreads.append(float(c.max() - c.mean()))
    wait = float(np.median(spreads))
    json.dump({"natural_step_time_s": t_nat, "forced_step_time_s": t_frc, "straggler_cost_s": t_nat - t_frc,
               "ep_wait_s": wait, "rest_s": t_nat - t_frc - wait, "steps": len(spreads)}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
