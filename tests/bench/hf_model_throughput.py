"""Benchmark baseline: forward + backward tokens/s of `transformers`' Qwen2-MoE on CPU.

  hf_model_throughput.py THREADS CONFIG_JSON   (prints JSON: tokens_per_s, seconds_per_step)
"""
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import transformers  # noqa: E402

threads, spec = int(sys.argv[1]), json.loads(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = transformers.Qwen2MoeConfig(
    vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
    num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], intermediate_size=spec["ffn"],
    moe_intermediate_size=spec["expert_ffn"], shared_expert_intermediate_size=spec["shared_ffn"],
    num_experts=spec["experts"], num_experts_per_tok=spec["topk"], norm_topk_prob=False, qkv_bias=True,
    max_position_embeddings=spec["seq"], tie_word_embeddings=False, output_router_logits=True,
    router_aux_loss_coef=0.001)
model = transformers.Qwen2MoeForCausalLM(cfg).float()
model.config._attn_implementation = "sdpa"
ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]))
times = []
for step in range(spec["steps"] + 1):
    start = time.perf_counter()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
step = sorted(times[1:])[len(times[1:]) // 2]  # median, first step excluded as warm-up
print(json.dumps({"seconds_per_step": step, "tokens_per_s": spec["batch"] * spec["seq"] / step}))
