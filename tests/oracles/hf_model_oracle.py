"""Test oracle: Hugging Face `transformers` models (fp32, CPU) for the C++ model tests.

  run KIND SEED TOKENS.json OUT.json
      builds a tiny random model of KIND (qwen2_moe, qwen2_moe_dense_layer, mixtral, qwen2, llama),
      runs it on the token ids with labels (and router logits for MoE), backpropagates the loss,
      and writes JSON: the config values, every parameter (name as in the model's state_dict,
      shape, values), the logits, the LM loss, the aux loss, the total loss and every gradient.

  save KIND SEED DIR
      the same random model, saved with save_pretrained (config.json + model.safetensors)
  logits DIR TOKENS.json OUT.json
      loads DIR with AutoModelForCausalLM.from_pretrained (fp32) and writes its logits and loss
  experts DENSE_DIR MOE_DIR OUT.json
      for every MoE layer of MOE_DIR (qwen2_moe or mixtral safetensors) and random inputs x: the
      sum of all routed experts at unit weight and the dense FFN of DENSE_DIR, both computed with
      torch from the raw tensors; and, per expert, how many of its gate rows are rows of the dense
      gate_proj. Writes JSON per layer: {"sum": [...], "dense": [...], "rows_from_dense": [...]}

Used only by tests; the framework never runs Python.
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import transformers  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build(kind):
    if kind.startswith("qwen2_moe"):
        cfg = transformers.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3,
                                          norm_topk_prob=False, decoder_sparse_step=1, qkv_bias=True,
                                          mlp_only_layers=[1] if kind.endswith("dense_layer") else [],
                                          router_aux_loss_coef=0.01, output_router_logits=True)
        return transformers.Qwen2MoeForCausalLM(cfg)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                                         router_aux_loss_coef=0.02, output_router_logits=True)
        return transformers.MixtralForCausalLM(cfg)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True}, intermediate_size=64)
        return transformers.Qwen2ForCausalLM(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**COMMON, intermediate_size=64)
        return transformers.LlamaForCausalLM(cfg)
    raise SystemExit(f"unknown kind {kind}")


def random_model(kind, seed):
    torch.manual_seed(int(seed))
    model = build(kind).float()
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():  # random everything, large enough that routing is not uniform
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return model


def save(kind, seed, directory):
    random_model(kind, seed).save_pretrained(directory)


def logits(directory, tokens_path, out_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.tensor(json.load(open(tokens_path)), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    json.dump({"logits": out.logits.reshape(-1).tolist(), "loss": out.loss.item()}, open(out_path, "w"))


def experts(dense_dir, moe_dir, out_path):
    from safetensors.torch import load_file
    dense = load_file(f"{dense_dir}/model.safetensors")
    moe = load_file(f"{moe_dir}/model.safetensors")
    cfg = json.load(open(f"{moe_dir}/config.json"))
    mixtral = cfg["model_type"] == "mixtral"
    n = cfg.get("num_local_experts", cfg.get("num_experts"))
    torch.manual_seed(0)
    silu = torch.nn.functional.silu
    result = {}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        g, u, d = (dense[p + f"mlp.{w}_proj.weight"].float() for w in ("gate", "up", "down"))
        x = torch.randn(16, g.shape[1])
        total = torch.zeros(16, g.shape[1])
        rows = []
        for e in range(n):
            if mixtral:
                eg, eu, ed = (moe[p + f"block_sparse_moe.experts.{e}.{w}.weight"].float() for w in ("w1", "w3", "w2"))
            else:
                eg, eu, ed = (moe[p + f"mlp.experts.{e}.{w}_proj.weight"].float() for w in ("gate", "up", "down"))
            total += (silu(x @ eg.T) * (x @ eu.T)) @ ed.T
            rows.append(int(sum(bool((g == r).all(dim=1).any()) for r in eg)))
        result[str(layer)] = {"sum": total.reshape(-1).tolist(),
                              "dense": ((silu(x @ g.T) * (x @ u.T)) @ d.T).reshape(-1).tolist(),
                              "rows_from_dense": rows}
    json.dump(result, open(out_path, "w"))


def main(kind, seed, tokens_path, out_path):
    model = random_model(kind, seed)
    ids = torch.tensor(json.load(open(tokens_path)), dtype=torch.long)
    kwargs = {"output_router_logits": True} if kind != "qwen2" else {}
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    params = {n: {"shape": list(p.shape), "values": p.detach().reshape(-1).tolist()} for n, p in model.state_dict().items()}
    grads = {n: p.grad.reshape(-1).tolist() for n, p in model.named_parameters() if p.grad is not None}
    aux = getattr(out, "aux_loss", None)
    json.dump({
        "config": model.config.to_dict(),
        "params": params,
        "logits": out.logits.detach().reshape(-1).tolist(),
        "loss": out.loss.item(),
        "aux_loss": None if aux is None else float(aux),
        "grads": grads,
    }, open(out_path, "w"))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        main(*sys.argv[2:6])
    elif sys.argv[1] == "save":
        save(*sys.argv[2:5])
    elif sys.argv[1] == "logits":
        logits(*sys.argv[2:5])
    elif sys.argv[1] == "experts":
        experts(*sys.argv[2:5])
    else:
        raise SystemExit("usage: hf_model_oracle.py run|save|logits ...")
