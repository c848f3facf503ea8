# shellcheck shell=bash
# Shared by the tests on the test hosts (tests/hosts/test_*.sh; sourced, not run): a fixture of two
# hosts and the head (test_hosts.sh), a work directory, both removed on exit, and the config of
# tests/unit/train_fixture.h (write_config) on byte-tokenized text like its dataset's.
#
#   source tests/hosts/hosts_common.sh
#   hosts_begin MOEFORGE_BINARY    # bin, here, root, fixture, work, h1, h2, hub; the fixture up
#   hosts_write_config             # $work/train.yaml, its dataset, $work/hostfile (2 slots a host)
#   hosts_mpi_env                  # the OMPI_MCA_* settings and MOEFORGE_* for run_multi_node.sh
#   say MESSAGE; fail WHAT LOG
# HOSTS_KEEP_WORK=1 keeps the work directory (configs, logs, run and save directories) for a look.
# Exits 77 (skipped) where namespaces cannot be made.

hosts_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { echo "[hosts +$((SECONDS - t0))s] $*"; }

fail() {
  echo "FAIL: $1 (log: $2)" >&2
  [[ -f $2 ]] && tail -n 40 "$2" >&2
  exit 1
}

# Called on exit: the fixture's teardown (every process in its namespaces killed, the namespaces
# deleted), then the work directory.
hosts_cleanup() {
  local rc=$?
  "$fixture" down
  if [[ -n ${HOSTS_KEEP_WORK:-} ]]; then echo "kept $work (HOSTS_KEEP_WORK)" >&2; else rm -rf "$work"; fi
  return $rc
}

# shellcheck disable=SC2034  # the variables it sets are the sourcing test's
hosts_begin() {
  bin=$(readlink -f "${1:?usage: $0 MOEFORGE_BINARY}")
  here=$hosts_here
  root=$(cd "$here/../.." && pwd)
  fixture=$here/test_hosts.sh
  if [[ ! -x $bin ]]; then
    echo "FAIL: $bin is not an executable" >&2
    exit 1
  fi
  t0=$SECONDS
  export HOSTS_PREFIX=mfh$$
  work=$(mktemp -d "${TMPDIR:-/tmp}/moeforge-hosts.XXXXXX")
  trap hosts_cleanup EXIT
  local rc=0
  "$fixture" up 2 > "$work/hosts" || rc=$?
  [[ $rc -eq 0 ]] || exit $rc
  h1=$HOSTS_PREFIX-h1 h2=$HOSTS_PREFIX-h2 hub=$HOSTS_PREFIX-hub
  say "hosts up: $(tr '\n' ' ' < "$work/hosts")"
}

hosts_write_config() {
  python3 - "$work/text.jsonl" << 'EOF'
import json, sys
words = "the expert router sends each token to four of sixty experts and a shared one adds its gated output loss".split()
state = 12345
with open(sys.argv[1], "w") as f:
    for d in range(400):
        n, text = 20 + state % 30, ""
        for w in range(n):
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            text += words[(state >> 33) % 20] + (". " if w % 9 == 8 else " ")
        f.write(json.dumps({"text": text}) + "\n")
EOF
  "$bin" data preprocess --input "$work/text.jsonl" --tokenizer byte --append-eod --output-prefix "$work/text" > "$work/preprocess.log" 2>&1 ||
    fail "data preprocess" "$work/preprocess.log"
  cat > "$work/train.yaml" << EOF
model:
  model_type: qwen2_moe
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 128
  vocab_size: 257  # bytes and the byte tokenizer's end of document
  rotary_base: 10000
  norm_epsilon: 1.0e-6
  add_qkv_bias: true
  untie_embeddings_and_output_weights: true
  num_experts: 8
  moe_ffn_hidden_size: 32
  moe_router_topk: 4
  moe_router_pre_softmax: true
  moe_router_load_balancing_type: hf_pooled_aux_loss
  moe_aux_loss_coeff: 0.01
  moe_shared_expert_intermediate_size: 64
  moe_shared_expert_gate: true
training:
  seq_length: 32
  micro_batch_size: 2
  global_batch_size: 8
  train_iters: 3
  lr: 2.0e-3
  min_lr: 2.0e-4
  lr_decay_style: cosine
  lr_warmup_iters: 3
  weight_decay: 0.1
  adam_beta2: 0.95
  clip_grad: 1.0
  deterministic: true
  eval_interval: 2
  eval_iters: 1
data:
  data_path: [$work/text_text_document]
  split: "90,10,0"
logging:
  run_dir: $work/run
hardware:
  peak_tflops: 1.0
  num_threads: 1
EOF
  "$fixture" hostfile 2 > "$work/hostfile"
}

# The settings a multi-node job on these hosts needs (the remote agent, the fixture's network).
hosts_mpi_env() {
  eval "$("$fixture" mpi-env)"
  export MOEFORGE_BIN=$bin MOEFORGE_IFACE=hnet0
}
