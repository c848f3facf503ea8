"""Test oracle for the MFU conventions of Qwen1.5-MoE-A2.7B: the parameters of transformers'
Qwen2MoeForCausalLM (built on the meta device, nothing allocated) sorted by name the way torchtitan's
get_moe_model_nparams_and_flops sorts them, and the FLOPs per step of each convention from those
counts.

  mfu_conventions_oracle.py BATCH SEQ OUT.json

Writes {"torchtitan_n", "torchtitan", "megatron", "hardware_full", "hardware_selective"}. Used only
by tests; the framework never runs Python.
"""
import json
import sys

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

LAYERS, HIDDEN, HEADS, EXPERTS, TOPK, VOCAB = 24, 2048, 16, 60, 4, 151936


def main(batch, seq, out_path):
    batch, seq = int(batch), int(seq)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=5632, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, num_experts=EXPERTS,
                         num_experts_per_tok=TOPK, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                         tie_word_embeddings=False, decoder_sparse_step=1)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(cfg)
    # torchtitan's buckets: the embedding (also counted dense), the router, the shared experts, the
    # routed experts (active at top-k / E), everything else dense.
    embedding = router = shared = experts = dense = 0
    # Megatron's MACs per token: every weight matrix a token passes through (no router, no gate).
    layer_macs = 0.0
    for name, p in model.named_parameters():
        n = p.numel()
        if "embed_tokens" in name:
            embedding += n
            dense += n
        elif "shared_expert" in name:
            shared += n
            if "shared_expert_gate" not in name:
                layer_macs += n
        elif "mlp.gate." in name:
            router += n
        elif "mlp.experts" in name:
            experts += n
            layer_macs += n * TOPK / EXPERTS
        else:
            dense += n
            if "layers." in name and "proj.weight" in name:
                layer_macs += n
    head_macs = HIDDEN * VOCAB
    n_active = dense - embedding + router + shared + experts * TOPK // EXPERTS
    tokens = batch * seq
    q = HIDDEN  # 16 heads of 128
    torchtitan = tokens * (6 * n_active + 12 * LAYERS * q * seq)
    attention = 6 * batch * seq * seq * q * LAYERS  # forward + backward, causal half
    megatron = 6 * tokens * (layer_macs + head_macs) + attention
    layers_forward = 2 * tokens * layer_macs + attention / 3
    json.dump({"torchtitan_n": n_active, "torchtitan": torchtitan, "megatron": megatron,
               "hardware_full": megatron + layers_forward,
               "hardware_selective": megatron + 2 * batch * seq * seq * q * LAYERS}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
