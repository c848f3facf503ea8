#!/usr/bin/env bash
# One-GPU benchmark of the mission's real shapes: Qwen1.5-MoE-A2.7B (hidden 2048, 60 experts of
# 1408 top-4, shared expert 5632, vocabulary 151,936) with 2 and 4 layers, sequence 8192,
# micro-batch 1, 4 micro-batches per step, bf16, on one GPU: tokens/s, TFLOP/s and MFU against the
# H200/H100 dense bf16 peak of 989 TFLOP/s, and a profile of the top operators and kernels of one
# step (logging.profile). Run by tests/gpu/device_check.sh; by hand on any GPU machine:
#   bash tests/bench/bench_gpu.sh BUILD/moeforge WORK_DIR RESULTS_DIR
# Writes RESULTS_DIR/bench.json, bench.md and top_ops.txt (tests/bench/bench_gpu_summary.py), with
# the mission's number: the 24-layer model's step time, tokens/s and MFU extrapolated from the two
# runs, t24 = t2 + 22 x (t4 - t2) / 2, and what that leaves out. Before each run, `moeforge plan` of
# its settings (its memory per rank in bench.json). Each run fails alone: the others and the report
# go on; the script's status is 1 when any run failed. The token ids are bytes of a synthetic text
# (any ids do for a speed measurement; the embedding and head keep the full vocabulary).
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

# The --set arguments of a run of L layers (plan and train alike), one per line.
settings() {  # settings LAYERS
  local L=$1 a
  local -a sets=(parallel.world_size=1 parallel.pipeline_model_parallel_size=1 parallel.expert_model_parallel_size=1
                 parallel.use_distributed_optimizer=false model.num_layers="$L" training.global_batch_size=4
                 training.train_iters="$iters" training.lr_warmup_iters=1 training.eval_iters=0
                 training.recompute_granularity=none "data.data_path=[$work/corpus_text_document]" 'data.split="100,0,0"'
                 'checkpoint.save=""' logging.run_dir="$work/layers$L" hardware.peak_tflops="$peak"
                 hardware.device="$device" training.seq_length="$seq" model.max_position_embeddings="$seq")
  for a in "${sets[@]}"; do printf -- '--set\n%s\n' "$a"; done
  for a in "${bench_extra[@]}"; do printf '%s\n' "$a"; done
}

failed=()
for L in $layers; do
  mapfile -t sets < <(settings "$L")
  rm -rf "$work/layers$L"
  # The memory plan of these settings (bench.json has each rank's peak; a plan that does not fit the
  # device is refused by `train` too).
  "$bin" plan "$root/configs/qwen1.5-moe-a2.7b.yaml" "${sets[@]}" --json > "$work/plan_layers$L.json" ||
    echo "moeforge plan failed for $L layers" >&2
  extra=()
  # The last iteration of the first configuration is profiled (and left out of the medians).
  [[ $L == "${layers%% *}" ]] && extra=(--set logging.profile=true --set logging.profile_step_start="$iters" \
                                        --set logging.profile_step_end=$((iters + 1)))
  if ! "$bin" train "$root/configs/qwen1.5-moe-a2.7b.yaml" "${sets[@]}" "${extra[@]}"; then
    echo "the $L-layer run failed; the others and the report go on" >&2
    failed+=("$L")
  fi
done

# shellcheck disable=SC2086  # the layer counts are words
python3 "$root/tests/bench/bench_gpu_summary.py" "$work" "$results" "$iters" "$seq" "$device" $layers || failed+=(report)
first=${layers%% *}
cp "$work/layers$first/profile/top_ops.txt" "$results/top_ops.txt" 2> /dev/null || echo "no profile was written" >&2
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
