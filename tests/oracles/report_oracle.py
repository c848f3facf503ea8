"""Test oracle for `moeforge report`: the steady-state statistics and the accuracy verdict
recomputed from metrics.jsonl files with numpy.

  report_oracle.py RUN_METRICS REF_METRICS WARMUP FROM_ITERATION OUT.json

Writes {"steady": {key: {median, mean, p25, p75, min, max, stdev, count}}, "mean_relative_error": x,
"compared": n}. Used only by tests; the framework never runs Python.
"""
import json
import sys

import numpy as np


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def main(run_path, ref_path, warmup, start, out_path):
    run, ref = load(run_path), load(ref_path)
    steady = {}
    for key in ("step_time_s", "tokens_per_s_per_device", "tflops_per_device", "tflops_6n_per_device", "mfu", "mfu_6n"):
        v = np.array([m[key] for m in run[int(warmup):]], dtype=np.float64)
        steady[key] = {"median": float(np.median(v)), "mean": float(v.mean()), "p25": float(np.percentile(v, 25)),
                       "p75": float(np.percentile(v, 75)), "min": float(v.min()), "max": float(v.max()),
                       "stdev": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "count": int(len(v))}
    ref_loss = {m["iteration"]: m["lm_loss"] for m in ref}
    errors = [abs(m["lm_loss"] - ref_loss[m["iteration"]]) / abs(ref_loss[m["iteration"]])
              for m in run if m["iteration"] >= int(start) and m["iteration"] in ref_loss]
    json.dump({"steady": steady, "mean_relative_error": float(np.mean(errors)), "compared": len(errors)},
              open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:6])
