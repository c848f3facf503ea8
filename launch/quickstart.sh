#!/usr/bin/env bash
# The main job at CPU size: set up, build, make a dataset from a real English corpus that every
# Debian system has offline (launch/corpus.sh: /usr/share/common-licenses), and train configs/quickstart.yaml
# (tiny.yaml's 60-expert top-4 model with a gated shared expert) for 40 iterations, printing MFU
# every step. Extra arguments go to `moeforge train` (e.g. --set training.train_iters=80).
#   bash launch/quickstart.sh
# The mission itself (Qwen1.5-MoE-A2.7B, 512 x 8192, PP 2 x EP 4) is sized by
#   build/moeforge plan configs/qwen1.5-moe-a2.7b.yaml
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash launch/setup.sh --runtime  # no test oracles, browser or fuzzer: the quickstart runs none
# The executable only, not the test suite; a first build with line tables for debug information
# and unity batches: half the time of a developer's build (README, "Build time").
MOEFORGE_NEW_BUILD_OPTIONS="-DMOEFORGE_DEBUG_INFO=lines -DCMAKE_UNITY_BUILD=ON" bash launch/build.sh moeforge

if [[ ! -f runs/quickstart/data/corpus_text_document.idx ]]; then
  bash launch/corpus.sh runs/quickstart/data/corpus
fi
# A fresh start each time (remove the checkpoints to keep them from being resumed).
rm -rf runs/quickstart/checkpoints
build/moeforge train configs/quickstart.yaml "$@"
echo
echo "metrics:    runs/quickstart/metrics.jsonl (one JSON object per iteration; keys in docs/training.md)"
latest=$(cat runs/quickstart/checkpoints/latest_checkpointed_iteration.txt)
echo "checkpoint: runs/quickstart/checkpoints/iter_$(printf %07d "$latest") (a Hugging Face checkpoint plus optimizer state)"
