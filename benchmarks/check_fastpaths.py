#!/usr/bin/env python
"""Check on the GPU that every speed option of prepare_for_training computes what the plain path computes.

    python benchmarks/check_fastpaths.py            # a 4-layer NF4 LLaMA, bf16 autocast, on cuda

For each variant: the loss and every LoRA gradient of one step on the same tokens and the same non-zero
LoRA weights, compared with the plain path, and the loss after three AdamW steps (it must move). bf16
compute: gradients agree to about 1e-2 relative (8-bit mantissa, summed in different orders). Bound: 2e-2.
"""

import argparse
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import minilora as ml
from minilora.loss import causal_lm_loss

VARIANTS = {"plain": {}, "offload": {"offload": True}, "fast": {"fast": True},
            "fast+keep": {"fast": True, "keep_weights": True}, "fast+cache": {"fast": True, "cached_layers": 2},
            "fast-no-ckpt": {"fast": True, "gradient_checkpointing": False, "cached_layers": 4},
            "fast+offload": {"fast": True, "offload": True}}


def run(model_dir, kwargs, ids, seed=0):
    device = ids.device.type
    model, _ = ml.load_model(model_dir, quant="nf4", compute_dtype=torch.bfloat16, device=device)
    torch.manual_seed(seed)
    ml.add_lora(model, targets=("q_proj", "v_proj", "down_proj"), r=16, alpha=16, dropout=0.0)
    with torch.no_grad():
        for p in ml.lora_state_dict(model).values():
            p.normal_(0, 0.02)
    ml.prepare_for_training(model, **{"gradient_checkpointing": True, **kwargs})
    model.train()
    params = ml.lora_state_dict(model)
    batch = {"input_ids": ids, "labels": ids}
    losses, grads = [], None
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    for step in range(4):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        if step == 0:
            grads = {k: p.grad.float().clone() for k, p in params.items()}
        losses.append(loss.item() / n)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", default="/tmp/minilora-check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(args.model_dir)
    from step import write_tokenizer  # benchmarks/ is this script's directory

    write_tokenizer(args.model_dir)
    ids = torch.randint(3, 32000, (2, 512), generator=torch.Generator().manual_seed(1)).to(args.device)
    ref_losses, ref_grads = run(args.model_dir, {}, ids)
    failed = False
    print(f"{'variant':15} {'loss0':>10} {'loss3':>10} {'max grad rel err':>17}")
    for name in args.variants.split(","):
        kwargs = VARIANTS[name]
        losses, grads = run(args.model_dir, kwargs, ids)
        err = max(((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()).item() for k in ref_grads)
        ok = abs(losses[0] - ref_losses[0]) <= 1e-2 * abs(ref_losses[0]) and err <= 2e-2 and losses[3] < losses[0]
        failed |= not ok
        print(f"{name:15} {losses[0]:10.5f} {losses[3]:10.5f} {err:17.2e}  {'ok' if ok else 'MISMATCH'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
