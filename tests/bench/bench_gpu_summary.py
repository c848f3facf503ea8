"""bench_gpu.sh's report: bench.json and bench.md from the runs' metrics.jsonl, with the mission's
number, the 24-layer model extrapolated from the 2- and 4-layer runs.

    python3 tests/bench/bench_gpu_summary.py WORK_DIR RESULTS_DIR ITERS SEQ DEVICE LAYERS...

Reads WORK_DIR/layers<L>/metrics.jsonl for each L (a run that failed or left no metrics is listed as
missing, the others are still reported) and WORK_DIR/plan_layers<L>.json (`moeforge plan --json` of
the same settings) where present. The steady iterations are 2 .. ITERS-1: the first warms up, the
last is profiled.

Note [per-layer extrapolation]: every layer of Qwen1.5-MoE-A2.7B is the same MoE
layer, so a step's time and its model FLOPs are, to first order, t(L) = t_0 + L * t_layer and
F(L) = F_0 + L * F_layer, the embedding, head and loss counted once in t_0 and F_0. From two runs
a < b: t_layer = (t_b - t_a) / (b - a) and t(24) = t_a + (24 - a) * t_layer (with 2 and 4 layers:
t24 = t2 + 22 * (t4 - t2) / 2); F(24) likewise from the runs' own FLOPs per step (Megatron's
formula and the 6N count are both affine in L, so this is exact), then tokens/s = tokens per step /
t(24), TFLOP/s = F(24) / t(24), MFU = TFLOP/s / peak. Left out: what one GPU with the whole model
does not do: the expert all-to-all (EP), the pipeline bubble and stage transfers (PP), the data-
parallel gradient reduction and ZeRO/distributed-optimizer sharding, and whether 24 layers fit in
memory at all (they do not on one GPU without those).
"""
import json
import os
import statistics
import sys

TARGET_LAYERS = 24
LEFT_OUT = ("the expert all-to-all (expert parallelism)", "the pipeline bubble and stage-to-stage transfers",
            "the data-parallel gradient reduction and the distributed optimizer (ZeRO-1) sharding",
            "memory: 24 layers do not fit on one GPU without those layouts")


def load_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steady(records, iters):
    """Iterations 2 .. iters-1: the first warms up, the last is profiled."""
    return [r for r in records if 2 <= r["iteration"] < iters]


def plan_peak_bytes(plan):
    """The largest planned peak of any stage's rank in `moeforge plan --json` (memory.stages[].peak_bytes)."""
    peaks = [s["peak_bytes"] for s in plan.get("memory", {}).get("stages", []) if "peak_bytes" in s]
    return max(peaks) if peaks else None


def row_of(layers, records, iters, seq, device):
    s = steady(records, iters)
    if not s:
        return None
    med = lambda k: statistics.median(x[k] for x in s)
    # What a step does, the same in every record: tokens and FLOPs (the metrics divide them by the time).
    last = s[-1]
    tokens = last["tokens_per_s_per_device"] * last["step_time_s"]
    flops = last["tflops_per_device"] * 1e12 * last["step_time_s"]
    flops_6n = last["tflops_6n_per_device"] * 1e12 * last["step_time_s"]
    m = records[-1]
    return {"layers": int(layers), "seq_length": seq, "device": device, "micro_batch_size": 1,
            "micro_batches": m["num_micro_batches"], "iterations_measured": len(s), "step_time_s": med("step_time_s"),
            "tokens_per_step": round(tokens), "flops_per_step_megatron": flops, "flops_per_step_6n": flops_6n,
            "tokens_per_s": med("tokens_per_s_per_device"), "tflops_megatron": med("tflops_per_device"),
            "tflops_6n": med("tflops_6n_per_device"), "mfu_megatron": med("mfu"), "mfu_6n": med("mfu_6n"),
            "peak_tflops": m["peak_tflops"], "host_peak_memory_bytes": m["peak_memory_bytes"],
            "lm_loss_last": m["lm_loss"], "host_syncs": med("host_syncs"),
            "gpu_peak_reserved_bytes": m.get("peak_memory_reserved_bytes"),
            "device_memory_total_bytes": m.get("device_memory_total_bytes"),
            "phases_s": {k: med(k) for k in ("time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s")}}


def extrapolate(rows, target=TARGET_LAYERS):
    """t(target) and F(target) from the fewest- and most-layer runs (Note [per-layer extrapolation])."""
    rows = sorted((r for r in rows if r["step_time_s"]), key=lambda r: r["layers"])
    if len(rows) < 2 or rows[0]["layers"] == rows[-1]["layers"]:
        return None
    a, b = rows[0], rows[-1]
    span = b["layers"] - a["layers"]
    per_layer = (b["step_time_s"] - a["step_time_s"]) / span
    step = a["step_time_s"] + (target - a["layers"]) * per_layer
    flops = a["flops_per_step_megatron"] + (target - a["layers"]) * (b["flops_per_step_megatron"] - a["flops_per_step_megatron"]) / span
    flops_6n = a["flops_per_step_6n"] + (target - a["layers"]) * (b["flops_per_step_6n"] - a["flops_per_step_6n"]) / span
    tokens = a["tokens_per_step"]
    peak = a["peak_tflops"]
    tflops, tflops_6n = flops / step / 1e12, flops_6n / step / 1e12
    return {"layers": target, "from_layers": [a["layers"], b["layers"]],
            "formula": f"t{target} = t{a['layers']} + {target - a['layers']} x (t{b['layers']} - t{a['layers']}) / {span}",
            "per_layer_s": per_layer, "head_and_embedding_s": a["step_time_s"] - a["layers"] * per_layer,
            "step_time_s": step, "tokens_per_step": tokens, "tokens_per_s": tokens / step,
            "flops_per_step_megatron": flops, "flops_per_step_6n": flops_6n,
            "tflops_megatron": tflops, "tflops_6n": tflops_6n, "mfu_megatron": tflops / peak, "mfu_6n": tflops_6n / peak,
            "peak_tflops": peak, "meaningful": per_layer > 0, "left_out": list(LEFT_OUT)}


def summarise(work, iters, seq, device, layers):
    rows, missing, plans = [], [], {}
    for L in layers:
        path = os.path.join(work, f"layers{L}", "metrics.jsonl")
        row = row_of(L, load_metrics(path), iters, seq, device) if os.path.exists(path) else None
        if row is None:
            missing.append(int(L))
        else:
            rows.append(row)
        plan_path = os.path.join(work, f"plan_layers{L}.json")
        if os.path.exists(plan_path):
            try:
                with open(plan_path) as f:
                    plans[str(L)] = plan_peak_bytes(json.load(f))
            except ValueError:
                plans[str(L)] = None
    return {"case": "Qwen1.5-MoE-A2.7B shapes, one GPU, bf16", "rows": rows, "missing_layers": missing,
            "plan_peak_bytes_per_rank": plans, "extrapolated": extrapolate(rows)}


def markdown(report):
    out = ["| layers | step (s) | tokens/s | TFLOP/s (Megatron) | MFU (Megatron) | MFU (6N) | host syncs / step |",
           "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        out.append(f"| {r['layers']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops_megatron']:.1f} | "
                   f"{100 * r['mfu_megatron']:.1f} % | {100 * r['mfu_6n']:.1f} % | {r['host_syncs']:.0f} |")
    x = report["extrapolated"]
    if x and x["meaningful"]:
        out.append(f"| **{x['layers']} (extrapolated)** | {x['step_time_s']:.3f} | {x['tokens_per_s']:.0f} | "
                   f"{x['tflops_megatron']:.1f} | {100 * x['mfu_megatron']:.1f} % | {100 * x['mfu_6n']:.1f} % | — |")
    out.append("")
    for L in report["missing_layers"]:
        out.append(f"The {L}-layer run left no steady iterations (it failed: bench.log says why).")
    if x:
        out.append(f"{x['layers']} layers: {x['formula']}; {x['per_layer_s'] * 1e3:.1f} ms per layer, "
                   f"{x['head_and_embedding_s'] * 1e3:.1f} ms for the embedding, head and loss (counted once); "
                   f"{x['flops_per_step_megatron']:.4g} FLOP per step (Megatron), {x['flops_per_step_6n']:.4g} (6N), "
                   f"extrapolated the same way (exact: both are affine in the layer count); MFU against "
                   f"{x['peak_tflops']:g} TFLOP/s.")
        if not x["meaningful"]:
            out.append("The per-layer time is not positive: the runs are too noisy for an extrapolation (bench.json "
                       "has its numbers).")
        out.append("Left out: " + "; ".join(x["left_out"]) + ".")
    else:
        out.append("No extrapolation: it needs two runs of different layer counts.")
    for L, peak in report["plan_peak_bytes_per_rank"].items():
        if peak:
            out.append(f"`moeforge plan` at {L} layers, these settings: {peak / 2**30:.2f} GiB per rank.")
    return "\n".join(out) + "\n"


def main(argv):
    work, results, iters, seq, device, layers = argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5], argv[6:]
    report = summarise(work, iters, seq, device, layers)
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(results, "bench.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if report["rows"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
