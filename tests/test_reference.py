"""A reference for the whole optimizer step, written from the formulas, against ml.train() step by step.

The reference trains PEFT's LoRA (peft.get_peft_model on transformers' LlamaForCausalLM, loaded from the same
tiny NF4 checkpoint) in plain torch, and shares no arithmetic with minilora's loss, LoRA layer, optimizer or
schedule, so that a bug they share cannot hide:
- loss: token-mean cross-entropy over the supervised labels of the whole optimizer step, that is the summed
  cross-entropy of all its micro-batches divided by the number of supervised tokens in all of them (not a mean
  per micro-batch, not per example); position t predicts label t + 1;
- clipping: the global L2 norm g of every LoRA gradient; each gradient is multiplied by
  min(1, max_norm / (g + 1e-6)), torch.nn.utils.clip_grad_norm_'s formula. The logged grad_norm is g, before
  clipping;
- AdamW with decoupled weight decay, written out: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
  mhat = m / (1 - b1^t), vhat = v / (1 - b2^t), p -= lr wd p, p -= lr mhat / (sqrt(vhat) + eps), with torch's
  defaults b1 = 0.9, b2 = 0.999, eps = 1e-8 (TrainConfig sets neither);
- schedule: warmup = int(warmup_ratio * total); update k (0-based) runs at lr times (k + 1) / (warmup + 1) while
  k < warmup, then 0.5 (1 + cos(pi (k - warmup) / (total - warmup))) ("cosine") or 1 ("constant").
  metrics.jsonl is written after the scheduler's step: its lr at step s is lr * factor(s), the rate of the
  next update (0 on the last line of a cosine run).

What the reference takes from minilora is not arithmetic: the examples (encode_rows), their padding (Collator)
and their order (minilora.data.batches, a seeded permutation that train() walks epoch after epoch), and the
initial LoRA values (ml.add_lora puts the layers on before train(), which then keeps them; A and B are then
overwritten with seeded random values, so that B is not zero and both A and B learn from the first step).

LoRA dropout is on, with the same masks on both sides: train() seeds torch with cfg.seed before its set-up,
and on the CPU every forward draws one mask per LoRA member, of its input's shape, q then v in each layer,
from that one stream (a checkpointed layer replays the forward's RNG state in its backward and leaves the
stream where the forward left it); PEFT's layers draw the same masks in the same order, so the reference seeds
torch the same way before its first step.

Tolerance, everywhere: 1e-5 relative, on the per-step losses, grad norms and learning rates, on the final LoRA
weights and on their total update over the run. Both sides compute in fp32 and differ in summation order only
(measured: <= 1e-6 on losses and norms, <= 4e-6 on the updates after 24 steps). Each case also checks that the
settings it exercises matter: the reference with any one of them changed is, 8 steps in, more than 100x the
tolerance away from the reference (measured: 9% to 80%).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import minilora as ml
from minilora.data import batches
from minilora.tiny import instruction_rows

ROWS = instruction_rows(16, seed=3)  # 16 examples of different lengths
TOL = 1e-5  # fp32 on both sides, summation order only (module docstring)
LORA = dict(r=8, alpha=16, dropout=0.1)
TARGETS = ("q_proj", "v_proj")
ADAM = dict(b1=0.9, b2=0.999, eps=1e-8)  # torch.optim.AdamW's defaults, which train() uses

# 24 steps, 6 of them warmup; micro-batches of 3 rows of different lengths (no grouping by length), 2 per step,
# and every 6th micro-batch the last of an epoch, with one row: a per-example or per-micro-batch mean would
# weight the rows differently. lr 1e-2 and weight decay 0.5 shrink the weights by about 6% over the run, and
# grad norms run 0.25 to 1: max_grad_norm 0.3 clips most steps.
MAIN = dict(max_steps=24, warmup_ratio=0.25, schedule="cosine", lr=1e-2, weight_decay=0.5, max_grad_norm=0.3,
            batch_size=3, grad_accum=2, group_by_length=False, max_len=128, seed=5)
# The same, clipped to a global norm of 1e-6: over the 7168 LoRA weights a clipped gradient entry is about 1e-8,
# Adam's eps, which then sets the size of every update. With the constant schedule.
EPS = {**MAIN, "max_grad_norm": 1e-6, "schedule": "constant"}

# Per case, each setting changed in turn: the reference with that change must be far from the reference after
# its first EARLY steps. mean="micro-batch" divides each micro-batch by its own supervised tokens and averages
# the micro-batches of a step.
EARLY = 8  # past the warmup, a third of the run
MATTERS = {
    "main": [dict(warmup_ratio=0.0), dict(max_grad_norm=math.inf), dict(weight_decay=0.0), dict(dropout=0.0),
             dict(mean="micro-batch")],
    "eps": [dict(eps=1e-7)],
}


def factor(step, warmup, total, schedule):
    """The lr multiplier of update `step` (0-based), from the formula."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def lora_model(base_dir, **variant):
    """A model with minilora's LoRA layers, A and B set to seeded random values (DoRA's magnitudes moved off their
    start); and those values by name. variant: add_lora's use_rslora or use_dora."""
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, targets=TARGETS, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], **variant)
    gen = torch.Generator().manual_seed(11)  # its own generator: the global stream is train()'s to seed
    with torch.no_grad():
        for name, p in ml.lora_state_dict(model).items():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(p * (1 + 0.1 * noise) if "magnitude" in name else noise * (0.1 if "lora_A" in name else 0.05))
    return model, tok, {k: v.detach().clone() for k, v in ml.lora_state_dict(model).items()}


def reference(base_dir, tok, init, hp, eps=ADAM["eps"], dropout=LORA["dropout"], mean="step", stop=None,
              **variant):
    """Train PEFT's LoRA from `init` under hp (TrainConfig's fields) from the formulas of the module docstring,
    for the first `stop` steps (default: all) of hp["max_steps"]; return ([(loss, pre-clip grad norm, logged
    lr) per step], [{name: weight} after each step]). variant: LoraConfig's use_rslora or use_dora."""
    model, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    peft = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=list(TARGETS),
                                            lora_dropout=dropout, **variant))
    params = peft_params(peft)
    assert params.keys() == init.keys()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(init[name])
    peft.train()

    examples, _ = ml.encode_rows(ROWS, tok, hp["max_len"])
    collate = ml.Collator(tok.pad_token_id)

    def micro_batches():  # train()'s order: batches of each epoch in turn, the epoch's last one maybe short
        for epoch in range(10**6):
            yield from map(collate, batches(examples, hp["batch_size"], hp["seed"],
                                            group_by_length=hp["group_by_length"], epoch=epoch))

    total = hp["max_steps"]
    warmup = int(hp["warmup_ratio"] * total)
    b1, b2 = ADAM["b1"], ADAM["b2"]
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    stream, log, weights = micro_batches(), [], []
    torch.manual_seed(hp["seed"])  # the dropout masks' stream, seeded where train() seeds it
    for step in range(stop or total):
        micro = [next(stream) for _ in range(hp["grad_accum"])]
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
        loss_sum = 0.0
        for b, count in zip(micro, counts):
            logits = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum",
                                 ignore_index=-100)
            (ce / sum(counts) if mean == "step" else ce / count / len(micro)).backward()
            loss_sum += ce.item()
        grads = {k: p.grad for k, p in params.items()}
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
        clip = min(1.0, hp["max_grad_norm"] / (norm + 1e-6))
        lr = hp["lr"] * factor(step, warmup, total, hp["schedule"])
        t = step + 1
        with torch.no_grad():
            for k, p in params.items():
                g = grads[k] * clip
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
                p -= lr * hp["weight_decay"] * p
                p -= lr * m_hat / (v_hat.sqrt() + eps)
                p.grad = None
        log.append((loss_sum / sum(counts), norm, hp["lr"] * factor(step + 1, warmup, total, hp["schedule"])))
        weights.append({k: p.detach().clone() for k, p in params.items()})
    return log, weights


def peft_params(peft) -> dict:
    """A PEFT model's trainable tensors by minilora's names (lora_state_dict's)."""
    return {name.removeprefix("base_model.model.").replace(".default", "").replace("vector.weight", "vector"): p
            for name, p in peft.named_parameters() if p.requires_grad}


def far(a, b, init) -> float:
    """The largest relative distance between two sets of LoRA weights, over tensors, measured on their updates
    from `init` (b's update is the yardstick)."""
    return max(float(((a[k] - init[k]) - (b[k] - init[k])).norm() / (b[k] - init[k]).norm()) for k in init)


@pytest.mark.parametrize("case", ["main", "eps"])
def test_train_matches_the_reference_step_by_step(base_dir, tmp_path, case):
    hp = {"main": MAIN, "eps": EPS}[case]
    model, tok, init = lora_model(base_dir)
    history = ml.train(model, tok, ROWS, ml.TrainConfig(
        output_dir=str(tmp_path / "run"), precision="fp32", log_every=1, progress=False, lora_r=LORA["r"],
        lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], targets=TARGETS, **hp))
    got = {k: v.detach().clone() for k, v in ml.lora_state_dict(model).items()}
    logged = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, hp["max_steps"] + 1))

    log, weights = reference(base_dir, tok, init, hp)
    ref = weights[-1]
    losses, norms, lrs = zip(*log)
    assert [h["loss"] for h in logged] == pytest.approx(losses, rel=TOL)
    assert [h["grad_norm"] for h in logged] == pytest.approx(norms, rel=TOL)  # before clipping
    assert [h["lr"] for h in logged] == pytest.approx(lrs, rel=TOL)
    for k in init:
        assert (got[k] - ref[k]).norm() <= TOL * ref[k].norm(), k
        assert ((got[k] - init[k]) - (ref[k] - init[k])).norm() <= TOL * (ref[k] - init[k]).norm(), k

    # the settings are ones that matter: clipping acts on most steps, and the reference with any one setting
    # changed is, after its first EARLY steps, more than 100x the tolerance away from the reference
    assert sum(n > hp["max_grad_norm"] for n in norms) >= 2 / 3 * len(norms)
    for change in MATTERS[case]:
        formula = {k: v for k, v in change.items() if k in ("eps", "dropout", "mean")}  # not TrainConfig's
        _, other = reference(base_dir, tok, init, {**hp, **change}, **formula, stop=EARLY)
        assert far(other[-1], weights[EARLY - 1], init) > 100 * TOL, change
