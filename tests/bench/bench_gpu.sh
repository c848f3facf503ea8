#!/usr/bin/env bash
# One-GPU benchmark of the mission's real shapes: Qwen1.5-MoE-A2.7B (hidden 2048, 60 experts of
# 1408 top-4, shared expert 5632, vocabulary 151,936) with 2 and 4 layers, sequence 8192,
# micro-batch 1, 4 micro-batches per step, bf16, on one GPU: tokens/s, TFLOP/s and MFU against the
# H200/H100 dense bf16 peak of 989 TFLOP/s, and a profile of the top operators and kernels of one
# step (logging.profile). Run by tests/gpu/device_check.sh; by hand on any GPU machine:
#   bash tests/bench/bench_gpu.sh BUILD/moeforge WORK_DIR RESULTS_DIR
# Writes RESULTS_DIR/bench.json, bench.md and top_ops.txt. The token ids are bytes of a synthetic
# text (any ids do for a speed measurement; the embedding and head keep the full vocabulary).
# Environment, to rehearse the script elsewhere: MOEFORGE_BENCH_DEVICE (cuda), MOEFORGE_BENCH_SEQ
# (8192), MOEFORGE_BENCH_LAYERS ("2 4"), MOEFORGE_BENCH_ITERS (5), MOEFORGE_BENCH_PEAK_TFLOPS (989),
# MOEFORGE_BENCH_EXTRA (more --set arguments, e.g. smaller widths).
set -euo pipefail
bin=${1:?usage: bench_gpu.sh MOEFORGE_BINARY WORK_DIR RESULTS_DIR}
work=${2:?usage}
results=${3:?usage}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
peak=${MOEFORGE_BENCH_PEAK_TFLOPS:-989}
layers=${MOEFORGE_BENCH_LAYERS:-2 4}
iters=${MOEFORGE_BENCH_ITERS:-5}
device=${MOEFORGE_BENCH_DEVICE:-cuda}
seq=${MOEFORGE_BENCH_SEQ:-8192}
read -r -a bench_extra <<< "${MOEFORGE_BENCH_EXTRA:-}"
mkdir -p "$work" "$results"

# A synthetic corpus: ~1 M byte tokens, deterministic.
if [[ ! -f $work/corpus_text_document.idx ]]; then
  awk 'BEGIN { srand(7); split("the expert router sends each token to four of sixty experts and a shared one adds its gated output while the loss falls", w, " ");
               for (d = 0; d < 2000; d++) { s = ""; for (i = 0; i < 90; i++) s = s w[int(rand() * 24) + 1] " "; printf "{\"text\": \"%s\"}\n", s } }' \
    > "$work/corpus.jsonl"
  "$bin" data preprocess --input "$work/corpus.jsonl" --tokenizer byte --append-eod --output-prefix "$work/corpus"
fi

run() {  # run NAME LAYERS EXTRA...
  local name=$1 L=$2
  shift 2
  "$bin" train "$root/configs/qwen1.5-moe-a2.7b.yaml" \
    --set parallel.world_size=1 --set parallel.pipeline_model_parallel_size=1 \
    --set parallel.expert_model_parallel_size=1 --set parallel.use_distributed_optimizer=false \
    --set model.num_layers="$L" --set training.global_batch_size=4 --set training.train_iters="$iters" \
    --set training.lr_warmup_iters=1 --set training.eval_iters=0 --set training.recompute_granularity=none \
    --set "data.data_path=[$work/corpus_text_document]" --set 'data.split="100,0,0"' \
    --set 'checkpoint.save=""' --set logging.run_dir="$work/$name" --set hardware.peak_tflops="$peak" \
    --set hardware.device="$device" --set training.seq_length="$seq" --set model.max_position_embeddings="$seq" \
    "${bench_extra[@]}" "$@"
}

for L in $layers; do
  extra=()
  # The last iteration of the first configuration is profiled (and left out of the medians).
  [[ $L == "${layers%% *}" ]] && extra=(--set logging.profile=true --set logging.profile_step_start="$iters" \
                                        --set logging.profile_step_end=$((iters + 1)))
  run "layers$L" "$L" "${extra[@]}"
done

python3 - "$work" "$results" "$iters" "$seq" "$device" $layers <<'PY'
import json, os, statistics, sys
work, results, iters, seq, device, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:]
rows = []
for L in layers:
    path = os.path.join(work, f"layers{L}", "metrics.jsonl")
    if not os.path.exists(path):
        continue
    m = [json.loads(line) for line in open(path)]
    steady = [x for x in m if 2 <= x["iteration"] < iters]  # iteration 1 warms up, the last is profiled
    med = lambda k: statistics.median(x[k] for x in steady) if steady else None
    rows.append({"layers": int(L), "seq_length": seq, "device": device, "micro_batch_size": 1, "micro_batches": m[-1]["num_micro_batches"],
                 "iterations_measured": len(steady), "step_time_s": med("step_time_s"),
                 "tokens_per_s": med("tokens_per_s_per_device"), "tflops_megatron": med("tflops_per_device"),
                 "tflops_6n": med("tflops_6n_per_device"), "mfu_megatron": med("mfu"), "mfu_6n": med("mfu_6n"),
                 "peak_tflops": m[-1]["peak_tflops"], "host_peak_memory_bytes": m[-1]["peak_memory_bytes"],
                 "lm_loss_last": m[-1]["lm_loss"], "host_syncs": med("host_syncs"),
                 "gpu_peak_reserved_bytes": m[-1].get("peak_memory_reserved_bytes"),
                 "phases_s": {k: med(k) for k in ("time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s")}})
json.dump({"case": "Qwen1.5-MoE-A2.7B shapes, one GPU, bf16", "rows": rows}, open(os.path.join(results, "bench.json"), "w"), indent=2)
with open(os.path.join(results, "bench.md"), "w") as f:
    f.write("| layers | step (s) | tokens/s | TFLOP/s (Megatron) | MFU (Megatron) | MFU (6N) | host syncs / step |\n"
            "|---|---|---|---|---|---|---|\n")
    for r in rows:
        f.write(f"| {r['layers']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops_megatron']:.1f} | "
                f"{100 * r['mfu_megatron']:.1f} % | {100 * r['mfu_6n']:.1f} % | {r['host_syncs']:.0f} |\n")
print(open(os.path.join(results, "bench.md")).read())
PY
first=${layers%% *}
cp "$work/layers$first/profile/top_ops.txt" "$results/top_ops.txt" 2> /dev/null || echo "no profile was written" >&2
