"""bench_gpu.sh's report (tests/bench/bench_gpu_summary.py) on a recorded pair of runs, against closed
forms computed here. ctest "bench_gpu report: the 24-layer extrapolation against its closed form".

The fixture (tests/bench/fixtures/bench_gpu/) is what bench_gpu.sh wrote on the CPU with small widths:
    MOEFORGE_BENCH_DEVICE=cpu MOEFORGE_BENCH_SEQ=64 MOEFORGE_BENCH_PEAK_TFLOPS=1 MOEFORGE_BENCH_EXTRA="--set
    model.hidden_size=64 --set model.num_attention_heads=4 --set model.num_query_groups=4 --set
    model.ffn_hidden_size=128 --set model.moe_ffn_hidden_size=32 --set model.moe_shared_expert_intermediate_size=64
    --set model.vocab_size=512 --set training.bf16=false" bash tests/bench/bench_gpu.sh build/moeforge WORK RESULTS
(2 and 4 layers, 5 iterations, global batch 4 x sequence 64).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_gpu_summary as summary  # noqa: E402

FIXTURE = os.path.join(HERE, "fixtures", "bench_gpu")
ITERS, SEQ, BATCH, PEAK = 5, 64, 4, 1.0

# The fixture's model: hidden h, 4 heads of 16 (q = kv = 64), 60 experts of f_moe top-4, a shared
# expert f_sh, SwiGLU (E_f = 3), vocabulary V (a multiple of 128 already), every layer MoE.
H, Q, KV, K, F_MOE, F_SH, V, E_F = 64, 64, 64, 4, 32, 64, 512, 3


def read(path):
    with open(path) as f:
        return f.read()


def megatron_flops(layers):
    """docs: /work/shared/reference/flops-mfu.md, Megatron's causal convention, per step."""
    tokens = BATCH * SEQ
    per_layer = H * (F_MOE * K * E_F + F_SH * E_F) + H * (Q + 2 * KV) + Q * H
    return 6 * tokens * (per_layer * layers + H * V) + 6 * BATCH * SEQ**2 * Q * layers


def six_n_flops(layers):
    """FlagPerf's N = L * (attention matmuls + 3 h x activated FFN width) + V h; 6 N per token."""
    n = layers * (H * (Q + 2 * KV) + Q * H + 3 * H * (K * F_MOE + F_SH)) + V * H
    return 6 * n * BATCH * SEQ


def median_step(layers):
    records = [json.loads(line) for line in read(os.path.join(FIXTURE, f"layers{layers}", "metrics.jsonl")).splitlines()]
    return statistics.median(r["step_time_s"] for r in records if 2 <= r["iteration"] < ITERS)


class Extrapolation(unittest.TestCase):
    def setUp(self):
        self.report = summary.summarise(FIXTURE, ITERS, SEQ, "cpu", ["2", "4"])

    def test_the_runs_flops_are_the_formulas(self):
        for row in self.report["rows"]:
            self.assertAlmostEqual(row["flops_per_step_megatron"] / megatron_flops(row["layers"]), 1, places=9)
            self.assertAlmostEqual(row["flops_per_step_6n"] / six_n_flops(row["layers"]), 1, places=9)
            self.assertEqual(row["tokens_per_step"], BATCH * SEQ)
            self.assertEqual(row["iterations_measured"], ITERS - 2)

    def test_24_layers_against_the_closed_form(self):
        t2, t4 = median_step(2), median_step(4)
        t24 = t2 + 22 * (t4 - t2) / 2
        x = self.report["extrapolated"]
        self.assertEqual(x["layers"], 24)
        self.assertEqual(x["from_layers"], [2, 4])
        self.assertAlmostEqual(x["per_layer_s"], (t4 - t2) / 2, places=12)
        self.assertAlmostEqual(x["head_and_embedding_s"], t2 - 2 * (t4 - t2) / 2, places=12)
        self.assertAlmostEqual(x["step_time_s"], t24, places=12)
        self.assertAlmostEqual(x["tokens_per_s"] / (BATCH * SEQ / t24), 1, places=9)
        self.assertAlmostEqual(x["flops_per_step_megatron"] / megatron_flops(24), 1, places=9)
        self.assertAlmostEqual(x["flops_per_step_6n"] / six_n_flops(24), 1, places=9)
        self.assertAlmostEqual(x["tflops_megatron"] / (megatron_flops(24) / t24 / 1e12), 1, places=9)
        self.assertAlmostEqual(x["mfu_megatron"] / (megatron_flops(24) / t24 / 1e12 / PEAK), 1, places=9)
        self.assertAlmostEqual(x["mfu_6n"] / (six_n_flops(24) / t24 / 1e12 / PEAK), 1, places=9)
        self.assertTrue(x["meaningful"])
        self.assertEqual(len(x["left_out"]), 4)

    def test_the_plan_of_each_run(self):
        for layers in ("2", "4"):
            plan = json.loads(read(os.path.join(FIXTURE, f"plan_layers{layers}.json")))
            self.assertEqual(self.report["plan_peak_bytes_per_rank"][layers], plan["memory"]["stages"][0]["peak_bytes"])


class TheCommand(unittest.TestCase):
    def run_summary(self, work, layers):
        results = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, results)
        r = subprocess.run([sys.executable, os.path.join(HERE, "bench_gpu_summary.py"), work, results, str(ITERS),
                            str(SEQ), "cpu", *layers], capture_output=True, text=True)
        return r, results

    def test_writes_json_and_markdown(self):
        r, results = self.run_summary(FIXTURE, ["2", "4"])
        self.assertEqual(r.returncode, 0, r.stderr)
        report = json.loads(read(os.path.join(results, "bench.json")))
        self.assertAlmostEqual(report["extrapolated"]["step_time_s"], median_step(2) + 11 * (median_step(4) - median_step(2)))
        md = read(os.path.join(results, "bench.md"))
        self.assertIn("| **24 (extrapolated)** |", md)
        self.assertIn("t24 = t2 + 22 x (t4 - t2) / 2", md)
        self.assertIn("Left out: the expert all-to-all", md)

    def test_a_failed_run_leaves_the_others_reported(self):
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work)
        shutil.copytree(os.path.join(FIXTURE, "layers2"), os.path.join(work, "layers2"))
        os.makedirs(os.path.join(work, "layers4"))  # a run that died before its first step
        r, results = self.run_summary(work, ["2", "4"])
        self.assertEqual(r.returncode, 0, r.stderr)
        report = json.loads(read(os.path.join(results, "bench.json")))
        self.assertEqual([row["layers"] for row in report["rows"]], [2])
        self.assertEqual(report["missing_layers"], [4])
        self.assertIsNone(report["extrapolated"])
        md = read(os.path.join(results, "bench.md"))
        self.assertIn("The 4-layer run left no steady iterations", md)
        self.assertIn("No extrapolation", md)

    def test_no_run_at_all_fails(self):
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work)
        r, results = self.run_summary(work, ["2", "4"])
        self.assertEqual(r.returncode, 1)
        self.assertTrue(os.path.exists(os.path.join(results, "bench.md")))


if __name__ == "__main__":
    unittest.main()
