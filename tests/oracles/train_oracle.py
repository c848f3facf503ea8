"""Test oracle: an independent PyTorch training loop over Hugging Face `transformers`, and
Megatron-Core's own learning-rate scheduler, for the trainer tests.

  init DIR SEED [OVERRIDES.json]
      a small Qwen2-MoE (the MODEL config below, with any overrides) initialized by transformers
      itself, saved with save_pretrained: the initial weights both trainers start from
  lr CASE [CASE ...]      (CASE = STYLE,WARMUP_ITERS,DECAY_ITERS,LR,MIN_LR,GLOBAL_BATCH,ITERS)
      for each case, the learning rate Megatron-Core's OptimizerParamScheduler applies in
      iterations 1..ITERS, driven as Megatron's training loop drives it: one JSON list of lists,
      on the last line of the output
  train DIR SAMPLES.json HPARAMS.json OUT.json
      trains the checkpoint in fp32 on the samples (as `moeforge data samples --json` prints them,
      consumed in order, global batch after global batch) with torch.optim.AdamW (no decay on
      biases and 1-D tensors), gradient accumulation over micro-batches, clip_grad_norm_ and
      Megatron-Core's scheduler; writes per-iteration lm loss, aux loss, grad norm, lr and step
      time (the benchmark's baseline)

Used only by tests; the framework never runs Python.
"""
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import transformers  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func  # noqa: E402

# Mirrored by the model section of the config in tests/unit/test_train.cpp.
MODEL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, intermediate_size=128,
             moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=4,
             norm_topk_prob=False, decoder_sparse_step=1, qkv_bias=True, mlp_only_layers=[],
             router_aux_loss_coef=0.01, output_router_logits=True, initializer_range=0.02)


def init(directory, seed, overrides=None):
    torch.set_num_threads(1)
    torch.manual_seed(int(seed))
    config = dict(MODEL, **(json.load(open(overrides)) if overrides else {}))
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**config)).float()
    model.save_pretrained(directory)


class _Groups:
    """The one attribute OptimizerParamScheduler touches."""

    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


def scheduler(style, warmup_iters, decay_iters, lr, min_lr, gbs, groups):
    # Megatron's training by iterations counts the schedule in samples.
    return OptimizerParamScheduler(groups, init_lr=0.0, max_lr=lr, min_lr=min_lr,
                                   lr_warmup_steps=warmup_iters * gbs, lr_decay_steps=decay_iters * gbs,
                                   lr_decay_style=style, start_wd=0.0, end_wd=0.0, wd_incr_steps=1,
                                   wd_incr_style="constant")


def lr_values(*cases):
    result = []
    for case in cases:
        style, warmup, decay, lr, min_lr, gbs, iters = case.split(",")
        groups = _Groups()
        s = scheduler(style, int(warmup), int(decay), float(lr), float(min_lr), int(gbs), groups)
        out = []
        for _ in range(int(iters)):
            out.append(groups.param_groups[0]["lr"])  # what this iteration's update uses
            s.step(increment=int(gbs))
        result.append(out)
    print(json.dumps(result))


def train(directory, samples_path, hparams_path, out_path):
    h = json.load(open(hparams_path))
    samples = json.load(open(samples_path))["samples"]
    torch.manual_seed(0)
    torch.set_num_threads(h.get("threads", 1))  # ctest runs two tests at once on two cores
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": h["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=0.0, betas=(h["adam_beta1"], h["adam_beta2"]), eps=h["adam_eps"], foreach=False)
    gbs, mbs = h["global_batch_size"], h["micro_batch_size"]
    sched = scheduler(h["lr_decay_style"], h["lr_warmup_iters"], h["lr_decay_iters"], h["lr"], h["min_lr"], gbs,
                      _Groups())
    n_micro = gbs // mbs
    cfg = model.config
    result = []
    for it in range(h["train_iters"]):
        start = time.perf_counter()
        lr = sched.optimizer.param_groups[0]["lr"]
        lm_sum = aux_sum = 0.0
        for m in range(n_micro):
            rows = samples[it * gbs + m * mbs: it * gbs + (m + 1) * mbs]
            tokens = torch.tensor([r["tokens"] for r in rows])
            labels = torch.tensor([r["labels"] for r in rows])
            mask = torch.tensor([r["loss_mask"] for r in rows], dtype=torch.float32)
            pos = torch.tensor([r["position_ids"] for r in rows])
            out = model(input_ids=tokens, position_ids=pos, output_router_logits=True)
            ce = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                                   labels.reshape(-1), reduction="none")
            lm = (ce * mask.reshape(-1)).sum() / mask.sum()
            aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
            ((lm + cfg.router_aux_loss_coef * aux) / n_micro).backward()
            lm_sum += lm.item()
            aux_sum += float(aux)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), h["clip_grad"]).item()
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step(increment=gbs)
        result.append({"iteration": it + 1, "lm_loss": lm_sum / n_micro, "aux_loss": aux_sum / n_micro,
                       "grad_norm": norm, "lr": lr, "step_time_s": time.perf_counter() - start})
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"init": init, "lr": lr_values, "train": train}[cmd](*args)
