"""The fast paths that exist only on a GPU: the Triton NF4, SwiGLU and RoPE kernels, torch's fused RMSNorm
kernels, the step replayed as CUDA graphs, activations offloaded on a side stream, and packed rows'
variable-length flash attention. Each against what it replaces, on the device it runs on.

These need CUDA (Triton kernels, CUDA graphs); on a machine without a GPU they are skipped, and the CPU suite
covers the same formulas through their CPU code (test_kernels.py). Results of a run on an H100 are kept in
benchmarks/results/.

Tolerances: the NF4 kernel computes bitsandbytes' arithmetic in bitsandbytes' order, so equality is exact.
bf16 paths: 2e-2 relative, as benchmarks/check_fastpaths.py (8-bit mantissa, different summation orders).
"""

import contextlib

import pytest
import torch

import minilora as ml
from minilora.kernels import nf4
from minilora.kernels.rmsnorm import FUSED_RMS_NORM, RMSNorm
from minilora.loss import causal_lm_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels and CUDA graphs need a GPU")
bnb = pytest.importorskip("bitsandbytes")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (96, 320), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_kernel_equals_bitsandbytes(shape, dtype, nested):
    w = torch.randn(shape, dtype=dtype, device="cuda") * 0.02
    q = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=nested).to("cuda")
    assert nf4.supported(q, dtype)
    got = nf4.dequantize_nf4(q, torch.full(shape, float("nan"), dtype=dtype, device="cuda"))  # every value written
    ref = bnb.functional.dequantize_4bit(q.data, q.quant_state)
    assert torch.equal(got, ref)


def test_fused_rms_norm_matches_the_formula():
    assert FUSED_RMS_NORM  # torch's CUDA build has the kernels; without them RMSNorm takes the plain ops
    x = torch.randn(6, 33, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    y = RMSNorm.apply(x, w, 1e-5)
    ref = w * (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    (ref_dx,) = torch.autograd.grad(ref, x, g)
    assert rel(y, ref) <= 2e-2 and rel(dx, ref_dx) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_kernels_match_the_formula(dtype):
    from minilora.kernels import swiglu

    gu = torch.randn(3, 50, 2 * 700, device="cuda", dtype=dtype) * 3
    dm = torch.randn(3, 50, 700, device="cuda", dtype=dtype)
    gate, up = gu.float().chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    ref_m = gate * s * up
    ref_grad = torch.cat([dm.float() * up * s * (1 + gate * (1 - s)), dm.float() * gate * s], dim=-1)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # one rounding to bf16 (8-bit mantissa), or fp32 ulps
    assert rel(swiglu.forward(gu), ref_m) <= tol
    grad = swiglu.backward_(gu, dm)
    assert grad.data_ptr() == gu.data_ptr() and rel(grad, ref_grad) <= tol  # written over gu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_of_cos", [1, 3])  # one position row for the batch (training), or one per row (decoding)
def test_rope_kernel_matches_the_formula(dtype, rows_of_cos):
    """The Triton rotary embedding against its torch formula (rope._rotate_torch), forward and backward, on
    grouped-query heads, with cos and sin whose halves differ (so each half's coefficient is checked). fp32:
    1e-6 relative, the same products summed once; bf16: 1e-2, the kernel rounds once where torch rounds twice."""
    from minilora.kernels import rope

    B, T, n_q, n_kv, hd = 3, 40, 4, 2, 64
    qkv = torch.randn(B, T, (n_q + 2 * n_kv) * hd, device="cuda", dtype=dtype, requires_grad=True)
    cos, sin = (torch.randn(rows_of_cos, T, 1, hd, device="cuda", dtype=dtype) for _ in range(2))
    grads = [torch.randn(B, n, T, hd, device="cuda", dtype=dtype) for n in (n_q, n_kv, n_kv)]
    outs = rope.Rope.apply(qkv, cos, sin, n_q, n_kv)
    (dqkv,) = torch.autograd.grad(outs, qkv, grads)
    x = qkv.detach().view(B, T, n_q + 2 * n_kv, hd)
    ref = torch.empty_like(x)
    rope._rotate_torch(x, ref, cos, sin, n_q + n_kv, backward=False)
    ref_grad = torch.empty_like(x)
    for g, d, n_rot in zip(grads, ref_grad.split([n_q, n_kv, n_kv], dim=2), (n_q, n_kv, 0)):
        rope._rotate_torch(g.transpose(1, 2), d, cos, sin, n_rot, backward=True)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(torch.cat([o.transpose(1, 2) for o in outs], dim=2), ref) <= tol
    assert rel(dqkv, ref_grad.flatten(2)) <= tol
    assert torch.equal(outs[2].transpose(1, 2), x[:, :, n_q + n_kv:])  # v passes through untouched


def test_rope_kernel_compiles_once_for_every_length():
    """Triton compiles a kernel for each specialization of its integer arguments (equal to 1, divisible by 16).
    The rotary kernel's sizes are not specialized, so a prompt's length and a decoded token's step (T = 1) run the
    kernel that training's lengths (multiples of 64) compiled: decoding compiles nothing on a fresh machine."""
    from minilora.kernels import rope

    def compiled() -> int:
        return len(rope._rope.device_caches[torch.cuda.current_device()][0])

    n_q, n_kv, hd = 4, 2, 64
    before = compiled()
    for B, T in [(2, 64), (2, 128), (1, 37), (2, 1), (1, 1), (3, 48)]:
        qkv = torch.randn(B, T, (n_q + 2 * n_kv) * hd, device="cuda", dtype=torch.bfloat16)
        cos, sin = (torch.randn(1, T, 1, hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        rope.Rope.apply(qkv, cos, sin, n_q, n_kv)
    assert compiled() - before <= 1  # the forward's, unless an earlier test compiled it already


def test_long_rows_attend_through_cudnn_as_through_flash():
    """Rows of LONG_ATTENTION tokens or more put cuDNN attention first; on the fast layer's strided q, k, v (views
    of one (B, T, heads, hd) tensor) it gives flash's output and gradients (bf16 tolerance)."""
    from minilora.kernels.attention import LONG_ATTENTION, attention_backends

    torch.manual_seed(0)
    qkv = torch.randn(1, LONG_ATTENTION, 3 * 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, 4, LONG_ATTENTION, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for seq_len in (LONG_ATTENTION, 1):  # cuDNN first, then flash first
        q, k, v = (t.transpose(1, 2) for t in qkv.split(4, dim=2))
        with attention_backends(seq_len):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        results.append((o, torch.autograd.grad(o, qkv, g)[0]))
    (o_long, g_long), (o_flash, g_flash) = results
    assert rel(o_long, o_flash) <= 2e-2 and rel(g_long, g_flash) <= 2e-2


def test_kept_attention_equals_sdpa():
    """The kept-attention path (the backend's own forward, then its backward on the kept output and logsumexp)
    against SDPA's autograd, on the fast layer's strided q, k, v, with cuDNN first and with flash first."""
    from minilora.kernels.attention import LONG_ATTENTION, KeptAttention, attention_backends, keep_attention

    torch.manual_seed(0)
    qkv = torch.randn(2, LONG_ATTENTION, 3 * 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 4, LONG_ATTENTION, 128, device="cuda", dtype=torch.bfloat16)
    for seq_len, backend in ((LONG_ATTENTION, "CUDNN_ATTENTION"), (1, "FLASH_ATTENTION")):
        q, k, v = (t.transpose(1, 2) for t in qkv.split(4, dim=2))
        with attention_backends(seq_len):
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1)
            (ref_grad,) = torch.autograd.grad(ref, qkv, g)
            with torch.no_grad():
                kept = keep_attention(q, k, v, 0.1)
            assert kept[2][0].name == backend
            o = KeptAttention.apply(q, k, v, 0.1, kept)
            (grad,) = torch.autograd.grad(o, qkv, g)
        assert rel(o, ref) <= 2e-2 and rel(grad, ref_grad) <= 2e-2


@pytest.mark.parametrize("n_kv", [4, 2])
def test_segment_attention_equals_attention_per_example(n_kv):
    """Variable-length flash attention over a packed row (the fast layer's strided q, k, v; examples of 1 to 700
    tokens, a padding piece, and empty examples at the end) against causal SDPA on each example alone: outputs
    and gradients within bf16 tolerance, 2e-2, with as many kv heads as q heads or fewer (grouped queries)."""
    from minilora.kernels.attention import Segments, segment_attention

    torch.manual_seed(0)
    lengths, n_q, hd = [700, 1, 130, 64, 300, 29], 4, 128
    T = sum(lengths)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist(), T, T], dtype=torch.int32, device="cuda")
    qkv = torch.randn(1, T, n_q + 2 * n_kv, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, n_q, T, hd, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([n_q, n_kv, n_kv], dim=2))
    o = segment_attention(q, k, v, Segments(starts, 700), 0.1)
    (grad,) = torch.autograd.grad(o, qkv, g)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=0.1, enable_gqa=n_kv != n_q)
        for a, b in zip(starts.tolist(), starts.tolist()[1:]) if b > a], dim=2)
    (ref_grad,) = torch.autograd.grad(ref, qkv, g)
    assert rel(o, ref) <= 2e-2 and rel(grad, ref_grad) <= 2e-2


@pytest.mark.parametrize("keep_attention", [False, True])
def test_offloaded_steps_equal_plain_steps(base_dir, mha_dir, monkeypatch, keep_attention):
    """Several steps with every layer's halves offloaded on the side stream (and the embedding table on the
    host) against the same layers checkpointed on the GPU: the same losses and LoRA weights (bf16 tolerance).
    Three steps of different shapes, so copies of one step overlap the next's allocations. keep_attention:
    the attention units also offload attention's output and logsumexp (every row length; as many kv heads as
    q heads)."""
    from minilora.kernels import attention as attention_mod

    kept, attention = [], attention_mod.keep_attention
    if keep_attention:
        monkeypatch.setattr(attention_mod, "KEEP_ATTENTION", 1)
        monkeypatch.setattr(attention_mod, "keep_attention", lambda *a: kept.append(attention(*a)) or kept[-1])
    results = []
    for offload in (False, True):
        model, tok = _load(mha_dir if keep_attention else base_dir, fast=True, gradient_checkpointing=True,
                           offload=offload)
        assert (model.model.embed_tokens.weight.device.type == "cpu") == offload
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for batch in _batches(tok, 3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, n = causal_lm_loss(model, batch)
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results.append((losses, {k: p.detach().clone() for k, p in ml.lora_state_dict(model).items()}))
    (plain_losses, plain), (off_losses, off) = results
    assert len(kept) == (2 * 3 if keep_attention else 0) and all(kept)  # every layer's forward kept attention
    assert off_losses == pytest.approx(plain_losses, rel=1e-2)
    assert all(rel(off[k], plain[k]) <= 1e-2 for k in plain)


def _load(base_dir, dropout=0.0, **prepare):
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    ml.add_lora(model, targets=("q_proj", "v_proj", "down_proj"), r=8, alpha=16, dropout=dropout)
    with torch.no_grad():
        for p in ml.lora_state_dict(model).values():
            p.normal_(0, 0.05)
    ml.prepare_for_training(model, **prepare)
    return model.train(), tok


def _batches(tok, n=3, packed=False):
    """n padded batches of 2, 3, 4, ... examples: n different shapes; or those examples packed into rows of
    1024 tokens: one shape, and 4 or 8 examples (with the padding's)."""
    from minilora.data import Collator
    from minilora.template import encode_rows
    from minilora.tiny import instruction_rows

    examples, _ = encode_rows(instruction_rows(4 * n, seed=5), tok, 256)
    collate = Collator(tok.pad_token_id, pad_to_multiple_of=64, pack_tokens=1024 if packed else None, max_len=512)
    return [collate(examples[4 * i: 4 * i + 2 + i]) for i in range(n)]


def test_fast_path_matches_transformers_on_gpu(base_dir):
    grads = []
    for prepare in (dict(gradient_checkpointing=True), dict(fast=True, gradient_checkpointing=True, keep_weights=True),
                    dict(fast=True, gradient_checkpointing=False, cached_layers=2),
                    dict(fast=True, gradient_checkpointing=True, offload=True)):  # side-stream copies, host table
        model, tok = _load(base_dir, **prepare)
        batch = _batches(tok, 1)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        grads.append((loss.item(), {k: p.grad.clone() for k, p in ml.lora_state_dict(model).items()}))
    (ref_loss, ref), *fast = grads
    for loss, g in fast:
        assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss)
        assert all(rel(g[k], ref[k]) <= 2e-2 for k in ref)


PREPARED = {"cached": dict(gradient_checkpointing=False, cached_layers=2),
            "checkpointed": dict(gradient_checkpointing=True),
            "checkpointed, kept weights": dict(gradient_checkpointing=True, keep_weights=True),
            "offloaded": dict(gradient_checkpointing=True, offload=True),
            "offloaded, kept attention": dict(gradient_checkpointing=True, offload=True),
            "checkpointed, packed": dict(gradient_checkpointing=True),
            "offloaded, packed": dict(gradient_checkpointing=True, offload=True)}


def _steps(base_dir, graphed: bool, layers: str, dropout: float):
    """Six micro-batches (three shapes, each twice), moved as train()'s FastPath moves them (dense, the rows of a
    host table), through its CUDA graphs or eagerly: (losses, LoRA grads, the GraphedSteps)."""
    from minilora.fast_path import FastPath
    from minilora.plan import PlanOptions, plan_options

    model, tok = _load(base_dir, dropout, fast=True, **PREPARED[layers])
    fast = FastPath(model, ml.TrainConfig(precision="bf16"), plan_options(PlanOptions(), **PREPARED[layers]))
    steps = fast.graphed(lambda b: causal_lm_loss(model, b)[0])
    assert steps is not None
    torch.cuda.manual_seed(7)
    losses = []
    for batch in _batches(tok, 3, packed="packed" in layers) * 2:  # three shapes, each replayed again
        b = fast.move(batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if graphed:
                loss = steps(b, 1.0 / b["n_tokens"]).clone()
            else:
                loss, n = causal_lm_loss(model, b)
                (loss / n).backward()
        losses.append(loss.item())
    return losses, {k: p.grad.clone() for k, p in ml.lora_state_dict(model).items()}, steps


@pytest.mark.parametrize("layers, dropout", [
    ("cached", 0.0), ("checkpointed", 0.0), ("checkpointed, kept weights", 0.0), ("checkpointed", 0.1),
    ("checkpointed, kept weights", 0.1), ("offloaded", 0.0), ("offloaded", 0.1), ("offloaded, kept attention", 0.0),
    ("checkpointed, packed", 0.0), ("offloaded, packed", 0.0)])
def test_graphed_steps_equal_eager_steps(base_dir, mha_dir, monkeypatch, layers, dropout):
    """Each batch shape's step captured once and replayed gives the eager steps' losses and gradients, with
    layers whose weights are kept dequantized, checkpointed ones (recomputed inside the graph, their weights
    dequantized there by the Triton kernel), or offloaded ones (their halves' inputs copied to pinned host memory
    and back on side streams inside the graph, the embedding table on the host; with kept attention, attention's
    output too: as many kv heads as q heads, every row length). With dropout, a graph draws other masks than
    eager steps (graph-safe generator offsets), so the reference is the graph of uncheckpointed layers from the
    same seed: a checkpointed unit's recompute must draw its forward's masks again, or its gradients differ by
    the dropped tenth of their inputs. Packed rows: one shape, whose graphs differ by the count of examples.
    Tolerances: bf16 (2e-2 grads, 1e-3 losses), as between eager runs."""
    from minilora.kernels import attention

    if layers == "offloaded, kept attention":
        monkeypatch.setattr(attention, "KEEP_ATTENTION", 1)
        base_dir = mha_dir
    losses, grads, steps = _steps(base_dir, True, layers, dropout)
    ref_losses, ref_grads, _ = _steps(base_dir, dropout > 0, "cached" if dropout else layers, dropout)
    # each shape was captured once (after one eager step, or each shape's first); packed: 4 and 8 examples
    assert len(steps.graphs) == (2 if "packed" in layers else 3)
    assert losses == pytest.approx(ref_losses, rel=1e-3)
    assert all(rel(grads[k], ref_grads[k]) <= 1e-2 for k in ref_grads)


def test_a_capture_survives_garbage_that_holds_cuda_state():
    """A step captured while an earlier run's garbage waits in a reference cycle (a captured graph and its pool,
    pinned host memory that a side stream copied from). Python's collector runs whenever allocations trigger it;
    here it runs inside the capture if it is enabled there, which kernels.graphs.capture prevents: freeing that
    garbage there would invalidate this capture and every later one in the process. The replay then gives the
    eager step's gradient (the same kernels: fp32 1e-6)."""
    import gc

    from minilora.kernels.graphs import GraphedSteps

    def garbage():
        x = torch.zeros(4096, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.add_(1)
        pinned, side = torch.ones(2**20, pin_memory=True), torch.cuda.Stream()
        with torch.cuda.stream(side):
            copy = pinned.to("cuda", non_blocking=True)
        cycle = {"graph": graph, "x": x, "pinned": pinned, "copy": copy}
        cycle["self"] = cycle
        return [cycle]

    held, collected = garbage(), []
    w = torch.randn(64, 64, device="cuda", requires_grad=True)

    def loss_fn(batch):
        if torch.cuda.is_current_stream_capturing() and held:
            held.clear()  # the cycle becomes garbage inside the capture
            if gc.isenabled():
                collected.append(gc.collect())
        return (batch["input_ids"].float() @ w).square().sum()

    steps = GraphedSteps([w], loss_fn)
    ids = torch.randint(0, 5, (8, 64), device="cuda")
    steps({"input_ids": ids.clone(), "n_tokens": 8}, 1.0)  # eager
    eager = w.grad.clone()
    w.grad.zero_()
    steps({"input_ids": ids.clone(), "n_tokens": 8}, 1.0)  # captured, then replayed
    torch.cuda.synchronize()
    assert not held and not collected and len(steps.graphs) == 1
    assert rel(w.grad, eager) <= 1e-6


@pytest.mark.parametrize("outcome", ["cached, graphs", "cached, eager", "checkpointed", "offloaded"])
def test_train_under_every_plan_outcome_equals_transformers_layers(base_dir, tmp_path, outcome):
    """train() on the GPU under each outcome of its memory plan, chosen by the budget: every weight kept
    dequantized with the steps replayed as CUDA graphs (a roomy budget), the same with cuda_graphs=False, every
    layer checkpointed (the leanest budget without offload), and offloaded (the leanest with it); graphs in
    both. Eight steps in bf16 without dropout: each step's loss within 2e-2 of transformers' layers (fast=False),
    bf16's rounding through different kernels; the plan line names the outcome."""
    from minilora.plan import GiB, PlanOptions, Setup, plan_memory
    from minilora.tiny import instruction_rows

    def run(out, **kw):
        model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
        cfg = ml.TrainConfig(output_dir=str(tmp_path / out), max_steps=8, batch_size=2, max_len=128, lr=1e-3,
                             lora_r=8, lora_alpha=16, lora_dropout=0.0, log_every=1, progress=False, **kw)
        history = ml.train(model, tok, instruction_rows(32, seed=3), cfg)
        return [h["loss"] for h in history if "loss" in h], history[0]["memory_plan"]

    from transformers import AutoConfig

    config, L = AutoConfig.from_pretrained(base_dir), 2
    setup = Setup(lora=ml.LoraSpec(r=8), compute_dtype=torch.bfloat16)
    # 2 x 128 tokens: the offloaded plan's host table saves more than its graphs' copy of the inputs costs
    lean = {o: plan_memory(config, 2, 128, PlanOptions(fast=True, checkpointed=L, offload=o, loss_chunk=512),
                           setup)["total"] / GiB for o in (False, True)}
    assert lean[True] < lean[False]
    kw, expect = {"cached, graphs": ({}, "2/2 layers' weights kept dequantized, 0/2 checkpointed"),
                  "cached, eager": ({"cuda_graphs": False}, "CUDA graphs off"),
                  "checkpointed": ({"memory_budget_gib": lean[False]}, "0/2 layers' weights kept dequantized, 2/2 "
                                                                       "checkpointed"),
                  "offloaded": ({"memory_budget_gib": lean[True]}, "their inputs and the embedding table in host memory")
                  }[outcome]
    reference, _ = run("reference", fast=False)
    losses, line = run("fast", **kw)
    assert expect in line, line
    assert ("CUDA graphs on" in line) == (outcome != "cached, eager"), line
    assert losses == pytest.approx(reference, rel=2e-2)


def _offload_every_layer(monkeypatch, **fields) -> list:
    """From here, train()'s plan offloads every layer's halves, CUDA graphs kept (the leanest plan with graphs),
    whatever the budget, with `fields` (PlanOptions) changed too: at these tiny shapes a tied embedding table stays
    on the GPU, and the offload alone then saves too little for the plan to choose it. Returns the list that
    receives the options each run used."""
    import dataclasses
    import importlib

    from minilora.plan_choice import plan_run

    used = []

    def offloaded(model, cfg):
        options, line, _ = plan_run(model, cfg)
        used.append(dataclasses.replace(options, checkpointed=None, cached_layers=0, offload=True, **fields))
        return used[-1], line, None

    monkeypatch.setattr(importlib.import_module("minilora.loop"), "plan_run", offloaded)
    return used


@pytest.mark.parametrize("budget", ["roomy", "offloaded"])
def test_each_family_trains_as_on_transformers_layers(family_dir, tmp_path, monkeypatch, budget):
    """Llama 3 (llama3 RoPE, tied embeddings), Mistral and Qwen2 (q, k, v biases, tied embeddings) through train()
    on the GPU: the default plan (weights kept dequantized, CUDA graphs) and the leanest (offloaded: a tied table
    stays on the GPU), against transformers' layers. Eight steps in bf16 without dropout, each step's loss within
    2e-2 (bf16's rounding through different kernels)."""
    from minilora.tiny import instruction_rows

    def run(out, **kw):
        model, tok = ml.load_model(family_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
        cfg = ml.TrainConfig(output_dir=str(tmp_path / out), max_steps=8, batch_size=2, max_len=128, lr=1e-3,
                             lora_r=8, lora_alpha=16, lora_dropout=0.0, log_every=1, progress=False,
                             targets=("q_proj", "k_proj", "v_proj", "down_proj"), **kw)
        history = ml.train(model, tok, instruction_rows(32, seed=3), cfg)
        return [h["loss"] for h in history if "loss" in h], history[0]["memory_plan"]

    reference, line = run("reference", fast=False)
    assert "transformers' decoder layers (fast=False)" in line
    used = _offload_every_layer(monkeypatch) if budget == "offloaded" else None
    losses, line = run("fast")
    assert "fast layers" in line and "CUDA graphs on" in line, line
    assert used is None or used[0].offload and used[0].graphs
    assert losses == pytest.approx(reference, rel=2e-2)


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(use_rslora=True)], ids=["dora", "rslora"])
@pytest.mark.parametrize("budget", ["roomy", "offloaded"])
def test_rslora_and_dora_train_as_on_transformers_layers(base_dir, tmp_path, monkeypatch, variant, budget):
    """rsLoRA and DoRA through train() on the GPU: the default plan (weights kept dequantized, CUDA graphs) and the
    leanest (offloaded, checkpointed halves, graphs), against transformers' layers with minilora's LoRALinear.
    Eight steps in bf16 without dropout (graphed steps draw other masks than eager ones; test_variants checks
    dropout on the CPU), each step's loss within 2e-2; the samples decode through the fast decoder (a CUDA graph)."""
    from minilora.tiny import instruction_rows

    def run(out, **kw):
        model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
        cfg = ml.TrainConfig(output_dir=str(tmp_path / out), max_steps=8, batch_size=2, max_len=128, lr=1e-3,
                             lora_r=8, lora_alpha=16, log_every=1, progress=False, sample_prompts=("Say hi.",),
                             sample_max_new_tokens=6, targets=("q_proj", "v_proj", "down_proj"),
                             lora_dropout=0.0, **variant, **kw)
        history = ml.train(model, tok, instruction_rows(32, seed=3), cfg)
        return [h["loss"] for h in history if "loss" in h], history[0]["memory_plan"]

    reference, _ = run("reference", fast=False)
    used = _offload_every_layer(monkeypatch) if budget == "offloaded" else None
    losses, line = run("fast")
    assert "fast layers" in line and "CUDA graphs on" in line, line
    assert used is None or used[0].offload and used[0].graphs
    assert losses == pytest.approx(reference, rel=2e-2)


@pytest.mark.parametrize("offload", [False, True])
def test_graphed_steps_take_each_shapes_checkpointing(base_dir, tmp_path, monkeypatch, offload):
    """train() on the GPU with a memory plan whose rule for shorter micro-batches (plan_choice.shape_options)
    checkpoints no layer at 2 x 64 tokens and every layer, the recompute keeping its weights, at 2 x 128: each
    shape's CUDA graph is captured with its own checkpointing, offloaded or not, and the eight steps' losses equal
    the default plan's within bf16's 2e-2 (the same arithmetic, other kernels' rounding)."""
    import dataclasses
    import importlib

    from minilora.kernels import layer as kernels
    from minilora.plan import PlanOptions
    from minilora.tiny import instruction_rows

    def run(out):
        model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
        cfg = ml.TrainConfig(output_dir=str(tmp_path / out), max_steps=8, batch_size=2, max_len=128, lr=1e-3,
                             lora_r=8, lora_alpha=16, lora_dropout=0.0, log_every=1, progress=False)
        return [h["loss"] for h in ml.train(model, tok, instruction_rows(32, seed=3), cfg) if "loss" in h]

    reference = run("default")
    loop, step = importlib.import_module("minilora.loop"), importlib.import_module("minilora.step")
    lean = PlanOptions(fast=True, checkpointed=2, offload=offload, keep_weights=True, loss_chunk=512)
    monkeypatch.setattr(loop, "plan_run", lambda model, cfg: (
        lean, "a lean plan", lambda B, T: dataclasses.replace(lean, checkpointed=0 if T <= 64 else 2)))
    seen, loss = {}, step.causal_lm_loss

    def recorded_loss(model, batch, chunk):  # run eagerly or at a capture: each shape's layers as they are set
        seen[tuple(batch["input_ids"].shape)] = [(kernels.fast_layer(layer).checkpoint,
                                                  kernels.fast_layer(layer).offload) for layer in model.model.layers]
        return loss(model, batch, chunk)

    monkeypatch.setattr(step, "causal_lm_loss", recorded_loss)
    losses = run("shapes")
    assert seen == {(2, 64): [(False, False)] * 2, (2, 128): [(True, offload)] * 2}
    assert losses == pytest.approx(reference, rel=2e-2)


@pytest.mark.parametrize("steps", ["graphed", "graphed-offloaded", "eager"])
def test_training_evaluation_and_samples_leave_the_planned_cublas_workspaces(base_dir, tmp_path, monkeypatch, steps):
    """cuBLAS keeps a workspace for each (thread, stream) it runs on. train() runs all its work on one stream: the
    eager steps (all of them, or the first, or each shape's first when offloaded), their captures, evaluation, and
    decoding's prefill, warm-up and capture. So it leaves two workspaces, the forward's thread's and the autograd
    thread's, the two that plan.CUBLAS_WORKSPACES counts, not the four or six of separate streams. Measured as the
    memory freed by dropping them all, against one workspace's size: two, and less than a third (a 1 MiB buffer
    beside them on the H200 is not one)."""
    import dataclasses
    import gc
    import importlib

    from minilora.plan import PlanOptions
    from minilora.tiny import instruction_rows

    def workspaces() -> int:  # bytes that cuBLAS's workspaces hold, dropped
        gc.collect()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch._C._cuda_clearCublasWorkspaces()
        return held - torch.cuda.memory_allocated()

    a = torch.ones(64, 64, device="cuda")
    workspaces()
    a @ a  # one workspace: this thread's, on the current stream
    one = workspaces()
    assert one > 0
    loop = importlib.import_module("minilora.loop")
    lean = PlanOptions(fast=True, checkpointed=2, offload=steps == "graphed-offloaded", keep_weights=True,
                       loss_chunk=512, graphs=steps != "eager")
    monkeypatch.setattr(loop, "plan_run", lambda model, cfg: (
        lean, "a lean plan", lambda B, T: dataclasses.replace(lean, checkpointed=0 if T <= 64 else 2)))
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
    cfg = ml.TrainConfig(output_dir=str(tmp_path / "out"), max_steps=6, batch_size=2, max_len=128, lora_r=8,
                         lora_alpha=16, progress=False, sample_prompts=("Say hello.",), sample_max_new_tokens=8,
                         eval_every=3)
    history = ml.train(model, tok, instruction_rows(32, seed=3), cfg, eval_rows=instruction_rows(4, seed=4))
    assert sum("sample" in h for h in history) == 2  # at the start and the end
    assert sum("eval_loss" in h for h in history) == 3  # at the start, step 3 and the end
    assert ("CUDA graphs off" in history[0]["memory_plan"]) == (steps == "eager")
    assert 2 * one <= workspaces() < 3 * one


def test_packed_training_equals_padded_training_on_the_gpu(base_dir, tmp_path):
    """train() on the GPU with packed micro-batches (variable-length flash attention, the steps replayed as CUDA
    graphs) against padded ones, on examples that all have max_len tokens, two to a pack: the steps hold the
    same examples, so each step's loss agrees within bf16 tolerance, 2e-2 (different attention kernels)."""
    from test_train import one_length_examples

    rows = one_length_examples(base_dir, 128)

    def run(out, **kw):
        model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
        cfg = ml.TrainConfig(output_dir=str(tmp_path / out), max_steps=6, batch_size=2, max_len=128, lr=1e-3,
                             lora_r=8, lora_alpha=16, lora_dropout=0.0, log_every=1, progress=False,
                             group_by_length=False, **kw)
        history = ml.train(model, tok, rows, cfg)
        return [h["loss"] for h in history if "loss" in h], history[0]["memory_plan"]

    reference, _ = run("padded")
    losses, line = run("packed", pack=True)
    assert "CUDA graphs on" in line, line
    assert losses == pytest.approx(reference, rel=2e-2)


@pytest.mark.parametrize("cached", [True, False])  # weights kept dequantized (the default plan) or the Triton
def test_decoding_replayed_as_a_cuda_graph_equals_eager_decoding(base_dir, cached):  # kernel inside the graph
    """The Decoder's token steps replayed as one CUDA graph give the eager steps' tokens exactly (the same
    kernels on the same inputs), and both follow transformers' generate through bitsandbytes' layers for the
    first tokens (bf16: different kernels and summation orders may flip a later near-tie, so 4 are compared)."""
    from minilora.kernels.decode import Decoder
    from minilora.kernels.layer import detach_fast, is_fast
    from minilora.plan import PlanOptions
    from minilora.template import encode_prompt

    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
    ml.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for p in ml.lora_state_dict(model).values():
            p.normal_(0, 0.5)
    ids = encode_prompt([{"role": "user", "content": "What is the capital of France?"}], tok)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        x = torch.tensor([ids], device="cuda")
        hf = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=None)[0, len(ids):].tolist()
        ml.prepare_for_training(model, PlanOptions(fast=True, cached_layers=2 if cached else 0))
        model.eval()
        graphed = Decoder(model, len(ids) + 40, torch.bfloat16)
        eager = Decoder(model, len(ids) + 40, torch.bfloat16, graphs=False)
        [tokens] = graphed([ids], 40, [])
        assert graphed.graph is not None and [tokens] == eager([ids], 40, []) == graphed([ids], 40, [])
        # two prompts of different lengths decoded together: graphed and eager alike, each row on its own course
        pair = [ids, encode_prompt([{"role": "user", "content": "Name three colours, please."}], tok)]
        rows = Decoder(model, max(map(len, pair)) + 40, torch.bfloat16, rows=2)
        answers = rows(pair, 40, [])
        assert rows.graph is not None and answers == Decoder(model, rows.max_len, torch.bfloat16, graphs=False,
                                                             rows=2)(pair, 40, [])
        assert answers[0][:4] == hf[:4] and answers[0] != answers[1]
    assert len(tokens) == 40 and tokens[:4] == hf[:4]
    # ml.generate on a GPU attaches fast layers for the call (dequantizing as they go: the same weights, bit
    # for bit), and drops them after
    detach_fast(model)
    answer = ml.generate(model, tok, "What is the capital of France?", max_new_tokens=40)
    until_eos = tokens[:tokens.index(tok.eos_token_id) + 1] if tok.eos_token_id in tokens else tokens
    assert answer == tok.decode(until_eos, skip_special_tokens=True).strip() and not is_fast(model)


def test_decoding_gathers_the_embedding_from_a_host_table(base_dir):
    """Under the lean plan the embedding table waits in host memory (250 MiB on a 7B shape). Decoding leaves it
    there: the prompt's and each chosen token's rows are gathered on the host and copied, so the answers are
    those of the same model with its table on the GPU, token for token (the same rows, the same kernels)."""
    from minilora.model import place_embedding
    from minilora.plan import PlanOptions

    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
    ml.add_lora(model, r=4, alpha=8)
    ml.prepare_for_training(model, PlanOptions(fast=True, offload=True, loss_chunk=512))
    table = model.model.embed_tokens.weight
    assert table.device.type == "cpu" and table.is_pinned()
    prompts = ["What is the capital of France?", "Name three colours, please."]
    on_host = [ml.generate(model, tok, p, max_new_tokens=24) for p in prompts]
    assert model.model.embed_tokens.weight.device.type == "cpu"
    place_embedding(model)
    assert [ml.generate(model, tok, p, max_new_tokens=24) for p in prompts] == on_host


def test_data_parallel_steps_replay_as_cuda_graphs(base_dir, tmp_path):
    """In a torch.distributed process group (NCCL, here one process on one GPU) the steps still replay as CUDA
    graphs, the LoRA grads live in one flat buffer that is all-reduced once a step, and the run trains what a
    run without a group does: the same graphs, and a sum over one process. Eight steps in bf16 with dropout 0.1
    and two micro-batches a step; losses within 1e-3 and the adapter within 1e-2 relative (bf16 runs of the
    same kernels; tighter than the 2e-2 between different kernels)."""
    from safetensors.torch import load_file

    from minilora.tiny import instruction_rows

    def run(out):
        model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
        cfg = ml.TrainConfig(output_dir=str(tmp_path / out), max_steps=8, batch_size=2, grad_accum=2, max_len=128,
                             lr=1e-3, lora_r=8, lora_alpha=16, lora_dropout=0.1, log_every=1, progress=False)
        history = ml.train(model, tok, instruction_rows(32, seed=3), cfg)
        weights = load_file(str(tmp_path / out / "adapter" / "adapter_model.safetensors"))
        return [h["loss"] for h in history if "loss" in h], history[0]["memory_plan"], weights

    with _process_group_of_one():
        losses, line, weights = run("group")
    ref_losses, _, ref = run("plain")
    assert "CUDA graphs on" in line, line
    assert losses == pytest.approx(ref_losses, rel=1e-3)
    assert all(rel(weights[k], ref[k]) <= 1e-2 for k in ref)


@pytest.mark.parametrize("loaded_on", ["cuda", "cpu"])
def test_sharded_training_equals_unsharded_on_the_gpu(base_dir, tmp_path, loaded_on):
    """fsdp=True in an NCCL group of one: the 4-bit weights as NF4Linear's parameters, gathered and dequantized
    by bitsandbytes on the GPU, through transformers' layers, against the same layers unsharded. The sharded
    model is loaded on the GPU, or in host memory (quantized there), and then only its shards go to the GPU.
    Eight steps in bf16 without dropout; losses within 1e-3 and the adapter within 1e-2 relative (bf16 runs of
    the same arithmetic: sharding changes where the weights live between layers, not what a layer computes).
    Both start from the same LoRA weights, made on the CPU (add_lora draws them on the base's device, and the
    CPU and CUDA generators differ), and the sharded base's packed bytes must equal the GPU-quantized ones."""
    from safetensors.torch import load_file

    from minilora.tiny import instruction_rows

    generator = torch.Generator().manual_seed(0)
    init = None

    def run(out, device="cuda", **kw):
        nonlocal init
        model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device=device)
        ml.add_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0)
        init = init or {k: torch.randn(p.shape, generator=generator) * 0.05
                        for k, p in ml.lora_state_dict(model).items()}
        with torch.no_grad():
            for k, p in ml.lora_state_dict(model).items():
                p.copy_(init[k])
        cfg = ml.TrainConfig(output_dir=str(tmp_path / out), max_steps=8, batch_size=2, max_len=128, lr=1e-3,
                             lora_r=8, lora_alpha=16, lora_dropout=0.0, log_every=1, progress=False, fast=False, **kw)
        history = ml.train(model, tok, instruction_rows(32, seed=3), cfg)
        weights = load_file(str(tmp_path / out / "adapter" / "adapter_model.safetensors"))
        packed = model.model.layers[0].mlp.down_proj.weight  # a base weight without LoRA, as trained
        packed = (packed.full_tensor().view(torch.uint8) if kw else packed.data).reshape(-1)
        return [h["loss"] for h in history if "loss" in h], history[0]["memory_plan"], weights, packed

    with _process_group_of_one():
        losses, line, weights, packed = run("sharded", loaded_on, fsdp=True)
    ref_losses, _, ref, ref_packed = run("plain")
    assert "sharded over 1 processes (FSDP2)" in line, line
    assert torch.equal(packed.cpu(), ref_packed.cpu())  # the same base, quantized where it was loaded
    assert losses == pytest.approx(ref_losses, rel=1e-3)
    assert all(rel(weights[k], ref[k]) <= 1e-2 for k in ref)


@contextlib.contextmanager
def _process_group_of_one():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}",
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layers", ["checkpointed", "offloaded"])
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_streamed_steps_equal_resident_steps(deep_dir, layers, graphed):
    """Seven layers whose 4-bit weights stream from pinned host memory through three device slots (copies on a
    side stream, a layer ahead of its use in the forward and the backward's recompute), against the same layers
    resident: the same losses and LoRA gradients, eagerly and as replayed CUDA graphs (the copies inside the
    graphs), with an evaluation forward between steps that leaves other layers in the slots. Six micro-batches,
    three shapes each twice. bf16: 1e-2, as between eager runs (attention's backward may sum in another order)."""
    from minilora.fast_path import FastPath
    from minilora.kernels import stream
    from minilora.plan import PlanOptions, plan_options

    results = []
    for streamed in (False, True):
        prepare = dict(PREPARED[layers], stream=streamed)
        model, tok = _load(deep_dir, 0.1, fast=True, **prepare)
        assert (stream.streamed(model.model.layers[0]) is not None) == streamed
        fast = FastPath(model, ml.TrainConfig(precision="bf16"), plan_options(PlanOptions(), **prepare))
        steps = fast.graphed(lambda b: causal_lm_loss(model, b)[0]) if graphed else None
        torch.cuda.manual_seed(7)
        losses = []
        for batch in _batches(tok, 3) * 2:
            b = fast.move(batch)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if graphed:
                    losses.append(steps(b, 1.0 / b["n_tokens"]).item())
                else:
                    loss, n = causal_lm_loss(model, b)
                    (loss / n).backward()
                    losses.append(loss.item())
                with torch.no_grad():
                    losses.append(causal_lm_loss(model, fast.move(_batches(tok, 1)[0]))[0].item())
        results.append((losses, {k: p.grad.clone() for k, p in ml.lora_state_dict(model).items()}))
    (ref_losses, ref), (got_losses, got) = results
    assert got_losses == pytest.approx(ref_losses, rel=1e-2)
    assert all(rel(got[k], ref[k]) <= 1e-2 for k in ref)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_streamed_train_equals_a_resident_one_on_the_gpu(deep_dir, tmp_path, monkeypatch, dora):
    """train() under a plan that streams the 4-bit weights (given here; the memory plan chooses it when nothing
    resident fits the budget), offloaded, with CUDA graphs, evaluation and samples: each step's loss within 1e-2
    of the resident run's (bf16). Afterwards the model stays streamed, and ml.generate (fast layers) and
    transformers' generate (its own layers) decode through the slots the tokens they decode once the weights are
    back on the device (the same kernels on the same weights: exactly). The streamed run's model loads as one too
    large for the card would (host_load.load_streamed): its codes wait in host memory, DoRA's first magnitudes are
    read from them, and a merge is refused."""
    from minilora.host_load import load_streamed
    from minilora.kernels.lora4bit import is_4bit
    from minilora.kernels.stream import parked, streamed
    from minilora.tiny import instruction_rows

    def run(out, stream):
        _offload_every_layer(monkeypatch, stream=stream)
        # streamed, the model loads as one too large for the card would: each linear quantized on the GPU and parked
        # in host memory (load_streamed)
        load = load_streamed if stream else ml.load_model
        model, tok = load(deep_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cuda")
        assert all(parked(m) == stream for m in model.modules() if is_4bit(m))
        if stream:
            with pytest.raises(ValueError, match="wait in host memory"):
                ml.merge_lora(model)
        cfg = ml.TrainConfig(output_dir=str(tmp_path / out), max_steps=6, batch_size=2, max_len=128, lr=1e-3,
                             lora_r=8, lora_alpha=16, lora_dropout=0.0, use_dora=dora, log_every=1, progress=False,
                             sample_prompts=("What is the capital of France?",), sample_max_new_tokens=12)
        history = ml.train(model, tok, instruction_rows(24, seed=3), cfg, eval_rows=instruction_rows(4, seed=9))
        return model, tok, history

    _, _, ref = run("resident", False)
    model, tok, got = run("streamed", True)
    assert [h["loss"] for h in got if "loss" in h] == pytest.approx([h["loss"] for h in ref if "loss" in h], rel=1e-2)
    assert [h["eval_loss"] for h in got if "eval_loss" in h] == pytest.approx(
        [h["eval_loss"] for h in ref if "eval_loss" in h], rel=1e-2)
    assert "CUDA graphs on" in got[0]["memory_plan"] and len([h for h in got if "sample" in h]) == 2
    assert streamed(model.model.layers[0]) is not None
    answer = ml.generate(model, tok, "Name three colours.", max_new_tokens=24)
    ids = tok("Name three colours.", return_tensors="pt").input_ids.cuda()
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tokens = model.eval().generate(ids, **greedy)
    ml.prepare_for_training(model, fast=True)  # the weights back on the device
    assert streamed(model.model.layers[0]) is None
    assert ml.generate(model, tok, "Name three colours.", max_new_tokens=24) == answer
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model.eval().generate(ids, **greedy), tokens)
