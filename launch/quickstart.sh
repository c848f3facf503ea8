#!/usr/bin/env bash
# The main job, as far as it exists today: set up, build, and plan the mission run
# (Qwen1.5-MoE-A2.7B, global batch 512 x 8192, PP 2 x EP 4 on 8 devices).
# Training lands with a later issue; this script then trains configs/tiny.yaml end to end.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash launch/setup.sh
bash launch/build.sh
build/moeforge plan configs/qwen1.5-moe-a2.7b.yaml "$@"
