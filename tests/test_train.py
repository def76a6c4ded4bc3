"""The training loop on a tiny NF4 LLaMA: what it logs, accumulation, resume, crashes, precisions and loop options,
each against the plain fp32 path. The step's arithmetic itself is checked against a reference written from the
formulas in test_reference.py."""

import importlib
import itertools
import json
import math
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

import minilora as ml
from minilora.data import batches, packs
from minilora.loss import supervised_count
from minilora.feed import Feed
from minilora.tiny import instruction_rows, tiny_config

checkpoint_module = importlib.import_module("minilora.checkpoint")
ROWS = instruction_rows(16, seed=3)  # 16 rows, 4 micro-batches of 4 per epoch


def run(base_dir, out, dtype=torch.float32, quant="nf4", rows=ROWS, **overrides):
    model, tok = ml.load_model(base_dir, quant=quant, compute_dtype=dtype, device="cpu")
    kw = dict(output_dir=str(out), max_steps=6, batch_size=4, lr=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.1,
              precision="fp32", log_every=1, max_len=128, progress=False, seed=7, keep_last=10)
    kw.update(overrides)
    return model, tok, ml.train(model, tok, rows, ml.TrainConfig(**kw))


def one_length_examples(base_dir, length: int):
    """encode_rows' (examples, stats) for 16 examples of `length` tokens each: BOS, 7 prompt tokens, then an
    answer, random ids of the tiny vocabulary."""
    tok = ml.load_tokenizer(base_dir)
    _, stats = ml.encode_rows(ROWS, tok, 128)
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(16):
        ids = [tok.bos_token_id] + torch.randint(3, len(tok), (length - 1,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 8 + ids[8:]})
    return examples, stats


def adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def grad_norms(history):
    return [h["grad_norm"] for h in history if "loss" in h]


def test_metrics_are_logged_and_aggregate_the_steps(base_dir, tmp_path):
    """metrics.jsonl holds the history. Logged every step, step 1's loss is the token-mean cross-entropy of the
    first batch under the base model (LoRA's B starts at zero, no dropout), as transformers computes it; logged
    every 4 steps, a line holds the token-weighted mean loss of its 4 steps and the grad norm and lr of its last,
    those of the run logged every step (same seed, same trajectory). fp32, 1e-5 relative: summation order."""
    common = dict(max_steps=12, lora_dropout=0.0)
    _, tok, history = run(base_dir, tmp_path / "each", **common)
    _, _, every4 = run(base_dir, tmp_path / "every4", log_every=4, **common)
    lines = [json.loads(line) for line in open(tmp_path / "each" / "metrics.jsonl")]
    assert lines == history
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib"} <= r.keys()
    assert steps[-1]["epoch"] == pytest.approx(12 / 4)  # one micro-batch a step, 4 micro-batches an epoch
    assert os.path.isfile(tmp_path / "each" / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "each" / "checkpoint-12" / "training_state.pt")

    # the batches of the 12 steps, in train()'s order (batch_size 4, seed 7, grouped by length), and their
    # supervised tokens (every label but the first that is not -100)
    examples, _ = ml.encode_rows(ROWS, tok, 128)
    order = [b for epoch in range(3) for b in batches(examples, 4, 7, group_by_length=True, epoch=epoch)]
    tokens = [sum(len(ex["labels"]) - 1 - ex["labels"][1:].count(-100) for ex in b) for b in order]
    base, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        first = base(**ml.Collator(tok.pad_token_id)(order[0])).loss.item()
    assert steps[0]["loss"] == pytest.approx(first, rel=1e-5)

    lines4 = [r for r in every4 if "loss" in r]
    assert [r["step"] for r in lines4] == [4, 8, 12]
    for r in lines4:
        window = range(r["step"] - 4, r["step"])
        mean = sum(steps[i]["loss"] * tokens[i] for i in window) / sum(tokens[i] for i in window)
        assert r["loss"] == pytest.approx(mean, rel=1e-5)
        assert r["grad_norm"] == pytest.approx(steps[r["step"] - 1]["grad_norm"], rel=1e-5)
        assert r["lr"] == pytest.approx(steps[r["step"] - 1]["lr"], rel=1e-5)


def test_accumulation_equals_big_batch(base_dir, tmp_path):
    # Rows have different lengths, so a per-micro-batch mean would weight them differently.
    common = dict(max_steps=1, lora_dropout=0.0, group_by_length=False)
    _, _, big = run(base_dir, tmp_path / "big", batch_size=4, grad_accum=1, **common)
    _, _, acc = run(base_dir, tmp_path / "acc", batch_size=1, grad_accum=4, **common)
    assert losses(big)[0] == pytest.approx(losses(acc)[0], rel=1e-5)
    # the grad norm before clipping is scale-sensitive; Adam's first update alone would hide a wrong scale
    g_big, g_acc = (next(h["grad_norm"] for h in hist if "grad_norm" in h) for hist in (big, acc))
    assert g_big == pytest.approx(g_acc, rel=1e-5)
    a, b = adapter(tmp_path / "big" / "adapter"), adapter(tmp_path / "acc" / "adapter")
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm(), k


@pytest.mark.parametrize("pack_tokens", [None, 140])
def test_the_processes_share_every_epoch_once(pack_tokens):
    """The micro-batch stream of 3 processes, padded (batch 2 each) or packed (140 tokens each): over each of
    two epochs the processes' shares hold every example once; in every global micro-batch each process counts
    the supervised tokens of all the shares; a process left without a share of the short last one gets an
    example that supervises nothing; and a stream started later (a resume) is the tail of the first."""
    rng = random.Random(0)
    examples = [{"input_ids": [1] * n, "labels": [-100] + [5] * (n - 1), "id": i}
                for i, n in enumerate(rng.randint(5, 60) for _ in range(25))]
    feeds = [Feed(examples, 2, 7, False, collate=lambda share: share, move=lambda share: share, rank=r, world=3,
                  pack_tokens=pack_tokens) for r in range(3)]
    per_epoch = [math.ceil(len(packs(examples, pack_tokens, 7, e)) / 3) if pack_tokens else math.ceil(25 / 6)
                 for e in (0, 1)]
    streams = [list(itertools.islice(f.stream(0), sum(per_epoch))) for f in feeds]
    for a, b in ((0, per_epoch[0]), (per_epoch[0], sum(per_epoch))):
        seen = [ex["id"] for s in streams for share, _ in s[a:b] for ex in share if supervised_count(ex["labels"])]
        assert sorted(seen) == list(range(25))
    for k in range(sum(per_epoch)):
        counts = {s[k][1] for s in streams}
        assert counts == {sum(supervised_count(ex["labels"]) for s in streams for ex in s[k][0])}
    last = [s[per_epoch[0] - 1][0] for s in streams]  # the first epoch's short last global micro-batch
    assert any(not supervised_count(share[0]["labels"]) for share in last)
    assert list(itertools.islice(feeds[1].stream(3), sum(per_epoch) - 3)) == streams[1][3:]


@pytest.mark.parametrize("pack", [False, True])
def test_resume_is_bit_exact(base_dir, tmp_path, pack):
    # 10 steps straight, checkpoints at 3 (mid first epoch) and 6 (mid second epoch: 4 micro-batches/epoch;
    # packed, 3 or 4 an epoch: resuming skips whole epochs of packs, which differ from epoch to epoch)
    run(base_dir, tmp_path / "straight", max_steps=10, save_every=3, pack=pack)
    final = adapter(tmp_path / "straight" / "adapter")
    for ckpt in ("checkpoint-3", "checkpoint-6"):
        out = tmp_path / f"from-{ckpt}"
        shutil.copytree(tmp_path / "straight" / ckpt, out / ckpt)
        _, _, history = run(base_dir, out, max_steps=10, save_every=3, resume="latest", pack=pack)
        resumed = adapter(out / "adapter")
        assert all(torch.equal(final[k], resumed[k]) for k in final), ckpt
        assert [h["step"] for h in history if "loss" in h][-1] == 10


def test_sampling_does_not_change_training(base_dir, tmp_path):
    run(base_dir, tmp_path / "plain", max_steps=4)
    _, _, history = run(base_dir, tmp_path / "sampled", max_steps=4, sample_every=2,
                        sample_prompts=("Which is bigger, 3 or 8?",), sample_max_new_tokens=5)
    assert [h["step"] for h in history if "sample" in h] == [0, 2, 4]
    a, b = adapter(tmp_path / "plain" / "adapter"), adapter(tmp_path / "sampled" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_wait_for_the_steps_is_training_time(base_dir, tmp_path, monkeypatch):
    """A logged interval's seconds include the wait for its steps' values (on a GPU, for the steps to finish),
    planted here as 0.3 s per read."""
    import time

    metrics = importlib.import_module("minilora.metrics")
    real = metrics.Metrics._read_pending
    monkeypatch.setattr(metrics.Metrics, "_read_pending", lambda self: (time.sleep(0.3), real(self))[1])
    _, _, history = run(base_dir, tmp_path, max_steps=3, lora_dropout=0.0)
    logged = [h for h in history if "loss" in h]
    assert len(logged) == 3 and all(h["seconds"] >= 0.3 for h in logged)


def test_the_time_account_covers_the_run(base_dir, tmp_path, monkeypatch):
    """train() logs where its wall time went, once, at the end: each part holds its own time (samples slowed by
    a planted 0.2 s each, checkpoints by 0.1 s each) and the parts add up to train()'s wall time. Bounds: the
    planted delays are lower bounds; 0.3 s covers what runs outside any part (the return, the loss plot)."""
    import time

    loop = importlib.import_module("minilora.loop")
    real_samples, real_save = loop.shared_samples, loop.save_checkpoint
    monkeypatch.setattr(loop, "shared_samples", lambda *a: (time.sleep(0.2), real_samples(*a))[1])
    monkeypatch.setattr(loop, "save_checkpoint", lambda *a: (time.sleep(0.1), real_save(*a))[1])
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    cfg = ml.TrainConfig(output_dir=str(tmp_path / "timed"), max_steps=4, batch_size=4, lora_r=8, max_len=128,
                         precision="fp32", progress=False, save_every=2, sample_every=2,
                         sample_prompts=("Which is bigger, 3 or 8?",), sample_max_new_tokens=5)
    start = time.perf_counter()
    history = ml.train(model, tok, ROWS, cfg)
    wall = time.perf_counter() - start
    records = [h for h in history if "time" in h]
    assert len(records) == 1 and records[0]["step"] == 4
    parts = records[0]["time"]
    assert list(parts) == ["set-up", "steps", "eval", "samples", "save"]
    assert parts["samples"] >= 3 * 0.2 and parts["save"] >= 2 * 0.1 and parts["eval"] == 0  # samples at 0, 2, 4
    assert parts["steps"] > 0 and parts["set-up"] > 0
    assert wall - 0.3 <= sum(parts.values()) <= wall + 0.05  # + 0.05: five parts rounded to 0.01 s


def test_crash_during_checkpoint_write_keeps_previous(base_dir, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint dies half-written
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run(base_dir, tmp_path, max_steps=6, save_every=2)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "metrics.jsonl", "train_config.json"]
    assert ml.rundir.latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    _, _, history = run(base_dir, tmp_path, max_steps=6, save_every=2, resume="latest")
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("fast,offload", [(False, False), (False, True), (True, False), (True, True)])
def test_checkpointing_matches_plain_backward(base_dir, fast, offload):
    """Checkpointed layers (transformers' or fast ones), with or without their inputs offloaded, give the loss
    and LoRA grads of transformers' layers without checkpointing, in fp32 (1e-5: summation order only).
    A fast layer offloads as two units (attention, MLP) through kernels/offload.Offload, with its projections
    dequantizing one member at a time; on the CPU that bookkeeping runs with plain copies."""
    _assert_same_backward(base_dir, dict(gradient_checkpointing=True, fast=fast, offload=offload))


@pytest.mark.parametrize("offload", [False, True])
def test_a_recompute_whose_last_projections_have_lora_matches_plain_backward(base_dir, offload):
    """A checkpointed unit's recompute runs grad_only: its last projection (o, down) computes no output and down's
    input no SwiGLU, unless their LoRA needs that input. With LoRA on every linear, o's and down's LoRA grads
    come from the recompute's inputs: loss and LoRA grads equal the plain layers' in fp32 at 1e-5."""
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    _assert_same_backward(base_dir, dict(gradient_checkpointing=True, fast=True, offload=offload), targets=targets)


def test_a_recompute_runs_no_gemm_for_its_last_projections(base_dir, monkeypatch):
    """The backward needs a recompute's graph, not its output: a checkpointed unit's recompute runs the GEMMs of
    qkv and gate/up again, and o's only where the MLP half reads its output (a whole layer is the unit), but not
    down's, nor SwiGLU's forward (down has no LoRA here). The plain run (transformers' layers) calls neither."""
    from minilora.kernels import layer as layer_mod
    from minilora.kernels import lora4bit, swiglu

    calls = []
    matmul, forward = lora4bit.Projection.matmul, swiglu.forward
    monkeypatch.setattr(lora4bit.Projection, "matmul",
                        lambda self, *a, **k: calls.append(self) or matmul(self, *a, **k))
    monkeypatch.setattr(swiglu, "forward", lambda gu: calls.append("swiglu") or forward(gu))
    for offload in (False, True):
        calls.clear()
        model = _assert_same_backward(base_dir, dict(gradient_checkpointing=True, fast=True, offload=offload))
        for spec in map(layer_mod.fast_layer, model.model.layers):  # the forward, then the recompute
            o = 1 if offload else 2  # offloaded, the attention half is a unit of its own
            assert [sum(c is p for c in calls) for p in (spec.qkv, spec.gate_up, spec.o, spec.down)] == [2, 2, o, 1]
        assert calls.count("swiglu") == len(model.model.layers)


def test_kept_attention_matches_plain_backward(mha_dir, monkeypatch):
    """An offloaded attention unit that keeps attention's output and logsumexp (rows of KEEP_ATTENTION tokens or
    more; here every row) recomputes no attention: its backward runs the backend's own backward on the kept
    tensors. Loss and LoRA grads equal the plain layers' in fp32 at 1e-5."""
    from minilora.kernels import attention as attention_mod

    kept, attention = [], attention_mod.keep_attention

    def spy(*args):
        kept.append(attention(*args))
        return kept[-1]

    monkeypatch.setattr(attention_mod, "KEEP_ATTENTION", 1)
    monkeypatch.setattr(attention_mod, "keep_attention", spy)
    _assert_same_backward(mha_dir, dict(gradient_checkpointing=True, fast=True, offload=True))
    assert len(kept) == 2 and all(kept)  # each layer's forward kept its attention


def test_two_offloaded_forwards_then_one_backward(base_dir):
    """Two forwards whose backward runs once, through their summed loss: the second forward must not reuse the
    host memory that the first's offloaded inputs still wait in (kernels/offload.HostArena is shared by one
    forward at a time), or the first's recompute reads the second's inputs."""
    _assert_same_backward(base_dir, dict(gradient_checkpointing=True, fast=True, offload=True), forwards=2)


def _assert_same_backward(base_dir, prepare, forwards=1, targets=("q_proj", "v_proj", "up_proj")):
    from minilora.data import Collator
    from minilora.template import encode_rows
    from minilora.loss import causal_lm_loss

    results = []
    for options in (dict(gradient_checkpointing=False), prepare):
        torch.manual_seed(0)
        model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
        ml.add_lora(model, targets=targets, r=8, alpha=16, dropout=0.1)  # dropout: the
        with torch.no_grad():  # recompute must replay the same masks; up_proj: a LoRA member of a split projection
            for p in ml.lora_state_dict(model).values():
                p.normal_(0, 0.1)
        ml.prepare_for_training(model, **options)
        model.train()
        examples, _ = encode_rows(ROWS[:4], tok, 128)
        torch.manual_seed(1)
        parts = [causal_lm_loss(model, Collator(tok.pad_token_id)(examples[i::forwards])) for i in range(forwards)]
        loss, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad for k, p in ml.lora_state_dict(model).items()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5)
    for k in g0:
        assert (g0[k] - g1[k]).norm() <= 1e-5 * g0[k].norm(), k
    return model  # the one prepared as `prepare` says


@pytest.mark.parametrize("precision,dtype,loss_tol,norm_tol", [("fp16", torch.float16, 1e-3, 2e-2),
                                                               ("bf16", torch.bfloat16, 3e-3, 5e-2)])
def test_half_precisions_follow_fp32(base_dir, tmp_path, precision, dtype, loss_tol, norm_tol):
    """Five steps under fp16 (with its GradScaler) or bf16 autocast, on a base in that dtype with fp32 LoRA
    master weights, against the same five steps in fp32: per-step losses, pre-clip grad norms and the final
    adapter. Tolerances, relative, from the rounding: an fp16 value carries 11 significant bits (2^-11 = 5e-4), a
    bf16 one 8 (2^-8 = 4e-3); the token-mean loss averages hundreds of roundings (measured <= 2e-4 for fp16, 6e-4
    for bf16: bounds 1e-3 and 3e-3); a grad norm sums squares of gradients that passed through every layer in
    half precision (measured 0.5% and 1.3%: bounds 2% and 5%). Adam moves each weight by about lr whatever the
    size of its gradient, so an entry whose gradient is near zero may move either way under rounding noise: the
    adapters differ by 9% (fp16) and 16% (bf16), bound 30%, where B, zero at the start, ends 100% away after
    steps that did not update, and about as far after steps at twice the lr. fp32's losses move by more than 10
    times loss_tol over the five steps, so the loss check alone catches an update that is not made."""
    common = dict(max_steps=5, lora_dropout=0.0)
    _, _, ref = run(base_dir, tmp_path / "fp32", **common)
    model, _, got = run(base_dir, tmp_path / precision, dtype=dtype, precision=precision, **common)
    assert max(abs(x / losses(ref)[0] - 1) for x in losses(ref)) > 10 * loss_tol
    assert all(map(torch.isfinite, map(torch.tensor, losses(got) + grad_norms(got))))
    assert losses(got) == pytest.approx(losses(ref), rel=loss_tol)
    assert grad_norms(got) == pytest.approx(grad_norms(ref), rel=norm_tol)
    a, b = adapter(tmp_path / "fp32" / "adapter"), adapter(tmp_path / precision / "adapter")
    for k in a:
        assert (a[k] - b[k]).norm() <= 0.3 * a[k].norm(), k
    lora_dtypes = {p.dtype for p in ml.lora_state_dict(model).values()}
    assert lora_dtypes == {torch.float32}  # fp32 master weights under either half precision


def test_fixed_plan_options_are_the_fields_the_config_sets():
    """The memory plan chooses what the config leaves None (train() on a GPU, and the example's memory check
    before the weights load); the rest it takes as given."""
    assert ml.TrainConfig(output_dir="x").fixed_plan() == {}
    off, on = (ml.TrainConfig(output_dir="x", gradient_checkpointing=v).fixed_plan() for v in (False, True))
    assert ml.plan.plan_options(**off).checkpointed == 0 and ml.plan.plan_options(**on).layers_checkpointed(32) == 32
    options = ml.choose_plan(tiny_config(), 4, 128, 2**40, fixed={"checkpointed": 1}).get("options")
    assert isinstance(options, ml.PlanOptions) and options.checkpointed == 1  # fixed: kept though memory abounds


def test_config_errors(base_dir, tmp_path):
    for bad, match in [(dict(precision="fp8"), "precision='fp8'"), (dict(schedule="linear"), "schedule='linear'"),
                       (dict(batch_size=0), "batch_size=0"), (dict(optimizer="sgd"), "optimizer='sgd'")]:
        with pytest.raises(ValueError, match=match):
            run(base_dir, tmp_path, **bad)
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float16, device="cpu")
    ml.add_lora(model, r=4, alpha=8, dtype=torch.float16)  # half-precision master weights
    with pytest.raises(ValueError, match="fp16 needs fp32 LoRA weights"):
        ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=str(tmp_path), precision="fp16", progress=False))


@pytest.mark.parametrize("variant,default,rows,adapter_tol", [
    (dict(batch_size=2, grad_accum=2), dict(batch_size=4), ROWS, 1e-5),
    (dict(batch_size=2, pack=True), dict(batch_size=2), "one length", 1e-5),
    (dict(batch_size=2, pack=True, fast=False), dict(batch_size=2, fast=False), "one length", 1e-4),
])
def test_loop_options_equal_the_default(base_dir, tmp_path, variant, default, rows, adapter_tol):
    """Six steps against the default loop on the same examples per step, without grouping by length: two
    micro-batches of 2 a step (a step's 4 examples are those of a batch of 4); or packed micro-batches of
    examples that all have max_len tokens, two to a pack (a pack holds what a padded batch of 2 holds, each
    example attending to itself alone: fast layers' segment attention, or transformers' layers with the segment
    mask, against padded batches through the same layers).
    fp32, no dropout, so per-step losses, pre-clip grad norms and final adapters agree to float32 round-off
    through Adam, 1e-5 relative. Transformers' layers, packed: their masked SDPA kernel rounds otherwise than the
    causal one (3e-7 of a step's gradients), and Adam's first updates, lr x sign(g), flip where a gradient entry
    is that small: the adapters end 2e-5 apart (bound 1e-4), while losses and grad norms agree to 1e-5."""
    common = dict(max_steps=6, lora_dropout=0.0, group_by_length=False)
    if rows == "one length":
        rows, common["max_len"] = one_length_examples(base_dir, 64), 64
    _, _, ref = run(base_dir, tmp_path / "default", rows=rows, **common, **default)
    _, _, got = run(base_dir, tmp_path / "variant", rows=rows, **common, **variant)
    assert len(losses(ref)) == 6
    assert losses(got) == pytest.approx(losses(ref), rel=1e-5)
    assert grad_norms(got) == pytest.approx(grad_norms(ref), rel=1e-5)
    a, b = adapter(tmp_path / "default" / "adapter"), adapter(tmp_path / "variant" / "adapter")
    for k in a:
        assert (a[k] - b[k]).norm() <= adapter_tol * a[k].norm(), k


def test_adamw_8bit_follows_adamw(base_dir, tmp_path):
    """bitsandbytes' AdamW8bit against torch's AdamW, six steps at r=64. bitsandbytes keeps the states of a
    tensor under 4096 entries in fp32 (at r=8 the two agree to 3e-7); at r=64 every LoRA tensor has 4096 or more,
    and its exp_avg and exp_avg_sq are 8-bit, blockwise: each update is off by about 1% of its size. Measured:
    losses 4e-6, grad norms 2e-4, adapters 1.1%; bounds 1e-4, 1e-3 and 5% (twice the lr ends 100% away,
    with losses 1e-2 apart), and the adapters must differ by more than 1e-3: the 8-bit states are in use."""
    common = dict(max_steps=6, lora_dropout=0.0, lora_r=64)
    _, _, ref = run(base_dir, tmp_path / "adamw", **common)
    _, _, got = run(base_dir, tmp_path / "adamw_8bit", optimizer="adamw_8bit", **common)
    assert losses(got) == pytest.approx(losses(ref), rel=1e-4)
    assert grad_norms(got) == pytest.approx(grad_norms(ref), rel=1e-3)
    a, b = adapter(tmp_path / "adamw" / "adapter"), adapter(tmp_path / "adamw_8bit" / "adapter")
    diff = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)
    assert 1e-3 < diff <= 5e-2


@pytest.mark.parametrize("variant", [dict(fast=False), dict(gradient_checkpointing=False),
                                     dict(fast=False, gradient_checkpointing=False)])
def test_training_equals_the_padded_fast_default(base_dir, tmp_path, variant):
    """Ten steps of the default path (fast layers, padded rows, every layer checkpointed on the CPU) against
    transformers' layers, and without checkpointing (either layers): fp32, no dropout, so the per-step
    losses and the final LoRA weights agree to float32 round-off through Adam, 1e-5 relative."""
    common = dict(max_steps=10, lora_dropout=0.0, max_len=128, lr=1e-3, log_every=1)
    _, _, ref = run(base_dir, tmp_path / "default", **common)
    _, _, got = run(base_dir, tmp_path / "variant", **common, **variant)
    assert len(losses(ref)) == 10
    assert losses(got) == pytest.approx(losses(ref), rel=1e-5)
    a, b = adapter(tmp_path / "default" / "adapter"), adapter(tmp_path / "variant" / "adapter")
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm(), k


def test_each_micro_batch_takes_its_shapes_checkpointing(base_dir, tmp_path, monkeypatch):
    """On a GPU the memory plan gives shorter micro-batches fewer checkpointed layers (plan_choice.shape_options),
    and the step applies each shape's choice before its forward. Here a rule checkpoints every layer, the
    recompute keeping its weights, for every other new shape, and none for the rest: each forward runs as its
    shape says, and the run equals the default one (every layer checkpointed): fp32 round-off through Adam, 1e-5,
    dropout on (a recompute draws its forward's masks again)."""
    from minilora.kernels import layer as kernels
    from minilora.plan import PlanOptions

    loop, step = importlib.import_module("minilora.loop"), importlib.import_module("minilora.step")
    plan, asked, forwards = loop.plan_run, {}, []

    def rule(B, T):  # as shape_options would answer: a PlanOptions per shape, asked once per shape
        assert (B, T) not in asked
        asked[B, T] = PlanOptions(fast=True, checkpointed=None if len(asked) % 2 else 0, keep_weights=True)
        return asked[B, T]

    monkeypatch.setattr(loop, "plan_run", lambda model, cfg: (*plan(model, cfg)[:2], rule))
    loss, apply = step.causal_lm_loss, kernels.Recomputed.apply

    def recorded_loss(model, batch, chunk):
        forwards.append([tuple(batch["input_ids"].shape), 0, [(kernels.fast_layer(layer).checkpoint,
                         kernels.fast_layer(layer).qkv.keep_weights) for layer in model.model.layers]])
        return loss(model, batch, chunk)

    def counted_apply(*args):
        forwards[-1][1] += 1
        return apply(*args)

    monkeypatch.setattr(step, "causal_lm_loss", recorded_loss)
    monkeypatch.setattr(kernels.Recomputed, "apply", counted_apply)
    common = dict(max_steps=6, max_len=128, lr=1e-3, log_every=1)
    _, _, got = run(base_dir, tmp_path / "shapes", **common)
    assert len(forwards) == 6 and len(asked) >= 2 and any(o.checkpointed == 0 for o in asked.values())
    for shape, recomputed, layers in forwards:
        n = asked[shape].layers_checkpointed(len(layers))
        assert recomputed == n and layers == [(i < n, i < n) for i in range(len(layers))]
    monkeypatch.undo()
    _, _, ref = run(base_dir, tmp_path / "default", **common)
    assert losses(got) == pytest.approx(losses(ref), rel=1e-5)
    a, b = adapter(tmp_path / "default" / "adapter"), adapter(tmp_path / "shapes" / "adapter")
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm(), k


@pytest.mark.parametrize("paged,plain", [("paged_adamw", "adamw"), ("paged_adamw_8bit", "adamw_8bit")])
def test_paged_optimizers_follow_their_unpaged_twins(base_dir, tmp_path, paged, plain):
    """Paging moves optimizer states between GPU and host memory and changes no number. On the CPU bitsandbytes
    runs the same update unpaged, so paged_adamw_8bit equals adamw_8bit bit for bit, and paged_adamw
    (bitsandbytes' 32-bit AdamW) follows torch's AdamW within 1e-5 (fp32, another kernel's summation order)."""
    common = dict(max_steps=6, lora_dropout=0.0, lora_r=64)
    _, _, ref = run(base_dir, tmp_path / plain, optimizer=plain, **common)
    _, _, got = run(base_dir, tmp_path / paged, optimizer=paged, **common)
    a, b = adapter(tmp_path / plain / "adapter"), adapter(tmp_path / paged / "adapter")
    if plain == "adamw_8bit":
        assert losses(got) == losses(ref) and all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert losses(got) == pytest.approx(losses(ref), rel=1e-5)
        assert all((a[k] - b[k]).norm() <= 1e-5 * a[k].norm() for k in a)


def test_a_model_that_carries_lora_trains_it_only_with_the_same_settings(base_dir, tmp_path):
    """train() on a model that has LoRA already: settings that differ from its adapter's are one error naming both
    sides, raised before the output directory is touched; the same settings train the model's adapter on from where
    it is, and the log, run.json and train_config.json say so. A merged model is refused."""
    model, tok, first = run(base_dir, tmp_path / "first", max_steps=3)  # r 8, alpha 16, dropout 0.1 on q and v
    kw = dict(max_steps=3, batch_size=4, lr=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.1, precision="fp32",
              log_every=1, max_len=128, progress=False, seed=7, save_every=3)
    model_side = r"the model already carries LoRA \(lora_r=8, lora_alpha=16, lora_dropout=0.1, targets=\('q_proj', " \
                 r"'v_proj'\)\), and this TrainConfig asks for "
    for change, asked in [({"lora_r": 4}, "lora_r=4"), ({"lora_alpha": 8}, "lora_alpha=8"),
                          ({"lora_dropout": 0.0}, "lora_dropout=0.0"), ({"targets": ("k_proj",)}, r"targets=\('k_proj',")]:
        with pytest.raises(ValueError, match=model_side + ".*" + asked):
            ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=str(tmp_path / "other"), **{**kw, **change}))
        assert not (tmp_path / "other").exists()
    history = ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=str(tmp_path / "second"), **kw))
    assert history[0]["adapter_start"] == "model"  # and a fresh run starts as "fresh"
    assert first[0]["adapter_start"] == "fresh"
    assert json.loads((tmp_path / "second" / "checkpoint-3" / "run.json").read_text())["adapter_start"] == "model"
    assert json.loads((tmp_path / "second" / "train_config.json").read_text())["adapter_start"] == "model"
    # the same first batch: a fresh adapter (B = 0) gives the base model's loss, the carried one does not
    assert losses(history)[0] < losses(first)[0] - 0.1
    ml.merge_lora(model)
    with pytest.raises(ValueError, match=r"merged into its weights \(merge_lora\).*load the base model again to "
                                         r"train a new adapter, or save the merged model \(save_merged\)"):
        ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=str(tmp_path / "merged"), **kw))
    assert not (tmp_path / "merged").exists()
