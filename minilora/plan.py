"""Predict the peak GPU memory of one minilora QLoRA training step before loading anything, and choose the
fastest way to train that fits a memory budget.

The peak is what `torch.cuda.max_memory_allocated` reports: persistent tensors (4-bit weights, adapters,
optimizer state, weights kept dequantized) plus the larger of two transient moments of a step:
  "loss"      the chunked cross-entropy's forward, with every layer's activations still held;
  "backward"  the backward of the last decoder layer (the first one recomputed if it is checkpointed), with
              every other layer's activations still held.
The CUDA context (~0.5 GiB) lives outside PyTorch's counters; it is reported beside the total, not in it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .kernels.layer import KEEP_ATTENTION

GiB = 2**30
CUBLAS_WORKSPACES = 2 * 32 * 2**20  # cuBLAS keeps a 32 MiB workspace per (thread, stream): forward + autograd thread
CUDA_CONTEXT = 512 * 2**20  # driver context + kernels; seen by nvidia-smi, not by torch's allocator counters
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}  # torch AdamW keeps exp_avg and exp_avg_sq, in each parameter's dtype
LOSS_CHUNKS = (4096, 2048, 1024, 512)  # supervised rows per vocabulary chunk that choose_plan tries, largest first
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}  # the projections of the fast layer: linears that read one input


def _linears(c):
    """(in, out) features of each linear of one decoder layer."""
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * hd
    H, I = c.hidden_size, c.intermediate_size
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def plan_memory(config, batch, seq_len, lora_r=64, lora_targets=("q_proj", "v_proj"), quant="nf4",
                double_quant=True, compute_dtype=torch.bfloat16, gradient_checkpointing=True, offload=False,
                loss_chunk=4096, optimizer="adamw", print_breakdown=False, lora_dropout=0.0, lora_dtype=None,
                fast=False, cached_layers=0, keep_weights=False, embedding_on_host=None):
    """Peak allocated bytes of a step of `minilora.train`'s loop (labels on every token), itemised.

    config: a LlamaConfig, a dict or anything with its fields. The other arguments are those of add_lora and
    prepare_for_training: gradient_checkpointing is True (every layer), False, or a number of layers (the
    first ones); fast, cached_layers and keep_weights describe the fast layer (minilora/kernels/layer.py);
    embedding_on_host (None: fast and offload, as prepare_for_training) puts the embedding table in `cpu`.
    Returns a dict: `breakdown` {term: bytes}, `total` (their sum, the predicted peak), `phase` (the moment
    it happens), `phases` (both candidates' transient bytes), `cpu` (pinned host bytes when offloading),
    `cuda_context` (outside `total`) and `inputs`.
    """
    c = SimpleNamespace(**config) if isinstance(config, dict) else config
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer={optimizer!r}; plan_memory knows {sorted(OPTIMIZER_STATES)}")
    lin = _linears(c)
    targets = [lora_targets] if isinstance(lora_targets, str) else list(lora_targets)
    if bad := [t for t in targets if t not in lin]:
        raise ValueError(f"lora_targets {bad} are not decoder-layer linears; use names from {list(lin)}")
    dt, ldt = compute_dtype.itemsize, (lora_dtype or torch.float32).itemsize  # add_lora's default: fp32
    L, H, I, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    nh, q, kv = c.num_attention_heads, lin["q_proj"][1], lin["k_proj"][1]
    B, T = batch, seq_len
    S, N = B * T, B * (T - 1)  # tokens through the decoder; supervised rows (position t predicts token t+1)
    ckpt = L if gradient_checkpointing is True else int(gradient_checkpointing)
    cached = min(cached_layers, L) if fast else 0
    b = {}

    # Frozen base. 4-bit: two weights per byte. Quant state: one absmax per 64-block, fp32; with double quant
    # that absmax is itself 8-bit (1 byte per 64 weights) plus an fp32 absmax per 256 of those and a 256-entry
    # fp32 code per weight. quant=None keeps every linear in the compute dtype (4x the 4-bit bytes for bf16).
    sizes = [i * o for i, o in lin.values()]
    layer_weights = sum(sizes) * dt  # one layer's linears, dequantized
    if quant is None:
        b["weights"], b["quant_state"] = L * layer_weights, 0
    else:
        b["weights"] = L * sum(math.ceil(n / 2) for n in sizes)
        b["quant_state"] = L * sum(n // 64 + 4 * math.ceil(n / 64 / 256) + 1024 if double_quant else 4 * (n // 64)
                                   for n in sizes)
    b["cached_weights"] = cached * layer_weights if quant is not None else 0
    # Embeddings and lm_head stay in the compute dtype (no fp32 upcast); one matrix if they are tied. An
    # embedding table in host memory leaves lm_head alone on the GPU.
    tied = getattr(c, "tie_word_embeddings", False)
    host_table = not tied and (default_embedding_on_host(fast, offload, ckpt) if embedding_on_host is None
                               else embedding_on_host)
    b["embed_lm_head"] = V * H * dt * (1 if tied or host_table else 2)
    b["norms"] = (2 * L + 1) * H * dt  # two RMSNorm weights per layer and the final one
    # LoRA: A (r, in) and B (out, r) per target per layer, in the adapters' dtype; AdamW's two states likewise.
    P = L * sum(lora_r * (lin[t][0] + lin[t][1]) for t in targets)
    b["lora"] = P * ldt
    b["optimizer"] = OPTIMIZER_STATES[optimizer] * P * ldt
    b["cublas_workspace"] = CUBLAS_WORKSPACES

    # Checkpointed layers keep their (B, T, H) input, in the compute dtype. With offload it sits in pinned host
    # memory: transformers' layers bring one back at a time; a fast layer is two units (attention, MLP) whose
    # inputs come back one unit ahead, so two are on the GPU in its backward (kernels/offload.py). The other
    # layers keep their full saved set.
    layer_fn = _fast_layer if fast else _hf_layer
    units = 2 if fast and offload else 1  # checkpointed units per layer
    # from KEEP_ATTENTION tokens a row an offloaded attention unit also keeps attention's output and fp32
    # logsumexp (right-padded rows, as many kv heads as q heads); they come back with its input
    kept_attention = S * q * dt + B * nh * T * 4 if units == 2 and T >= KEEP_ATTENTION and q == kv else 0
    lora_cast = sum(lora_r * (lin[t][0] + lin[t][1]) for t in targets) * dt if ldt != dt else 0
    # the layer's LoRA weights, cast to the compute dtype for its matmuls, are kept for the backward
    saved = layer_fn(S, B * nh * T, H, I, q, kv, dt, lora_r, targets, lin, lora_dropout)["saved"] + lora_cast
    cpu = (units * ckpt * S * H * dt + ckpt * kept_attention if offload else 0) + (V * H * dt if host_table else 0)

    def held(n, inputs=None):  # activations of the layers 0..n-1 (the later ones' are freed by then)
        inputs = inputs if inputs is not None else min(ckpt, n, 1) if offload else min(ckpt, n)
        return inputs * S * H * dt + max(0, n - ckpt) * saved

    def backward(i):  # layer i's backward: its saved set (kept, or recomputed) and transients, every LoRA grad
        # A fast layer's projections dequantize their weights again here, unless cached, or kept from the
        # recompute (then the layer's dequantized weights are all held through its backward); offloaded, they
        # dequantize one member at a time.
        kept_w = fast and keep_weights and i < ckpt and i >= cached and quant is not None
        deq = fast and quant is not None and not (i < cached or kept_w)
        fast_options = dict(deq=deq, split=units == 2 and deq, recomputed=i < ckpt) if fast else {}
        lay = layer_fn(S, B * nh * T, H, I, q, kv, dt, lora_r, targets, lin, lora_dropout, **fast_options)
        extra = (layer_weights if kept_w else 0) + P * ldt
        if i < ckpt and units == 2:  # one half recomputed at a time; its input is one of the two held, and
            # in the MLP half's backward the attention unit's kept tensors are arriving too
            (att_s, att_t), (mlp_s, mlp_t) = lay["halves"]
            half = max(att_s + att_t, mlp_s + mlp_t + kept_attention) - S * H * dt + lora_cast
            return held(i + 1, inputs=2 if i else 1), half + extra  # no prefetch below the first
        # a fast layer's recompute saves its input again, which is the checkpointed input already held
        recomputed = saved - (S * H * dt if fast else 0) if i < ckpt else 0
        return held(i + 1), recomputed + lay["transient"] + extra

    # Loss (minilora.loss): the last hidden states, the final norm's fp32 copy and bf16 output, the (N, H)
    # supervised rows and their gradient (computed in the forward), and per chunk of n = min(N, loss_chunk)
    # rows: the fp32 logits and one transient beside them (the bf16 matmul output, then the bf16 softmax
    # gradient), counted at 8 bytes a logit, which over-predicts the measured H100 peaks by 2-5%.
    n = min(N, loss_chunk)
    moments = {"loss": (held(L), S * H * (4 + dt) + 2 * N * H * dt + n * V * max(8, 4 + dt))}
    # The backward peaks at its first layer, or at the first checkpointed one, which recomputes (and perhaps
    # keeps weights) while fewer activations are held.
    moments["backward"] = max((backward(i) for i in {L - 1, max(ckpt - 1, 0)}), key=sum)
    phase = max(moments, key=lambda k: sum(moments[k]))
    phases = {k: extra for k, (_, extra) in moments.items()}
    b["activations"], extra = moments[phase]
    b["lora_grads"] = P * ldt if phase == "backward" else 0
    b["layer_backward"] = extra - P * ldt if phase == "backward" else 0
    b["loss"] = extra if phase == "loss" else 0
    plan = {"breakdown": b, "total": sum(b.values()), "phase": phase, "phases": phases, "cpu": cpu,
            "cuda_context": CUDA_CONTEXT,
            "inputs": dict(batch=B, seq_len=T, lora_r=lora_r, lora_targets=targets, quant=quant, offload=offload,
                           lora_dropout=lora_dropout, fast=fast, gradient_checkpointing=ckpt, cached_layers=cached,
                           keep_weights=keep_weights, loss_chunk=loss_chunk, layers=L, embedding_on_host=host_table)}
    if print_breakdown:
        print(format_plan(plan))
    return plan


def default_embedding_on_host(fast: bool, offload: bool, checkpointed: int) -> bool:
    """What embedding_on_host=None means, in prepare_for_training and plan_memory: the frozen embedding table
    waits in host memory in the lean mode, fast layers that offload their checkpoints."""
    return bool(fast and offload and checkpointed)


def _hf_layer(S, SH_lse, H, I, q, kv, dt, r, targets, lin, dropout):
    """{"saved", "transient"} bytes of one transformers decoder layer under bf16 autocast, SDPA (bitsandbytes
    dequantizes one weight at a time, within the transients).

    Saved: each RMSNorm keeps an fp32 copy of its input (LlamaRMSNorm upcasts); SDPA keeps q, k, v, its output
    (also o_proj's input) and an fp32 logsumexp per head and row; the MLP keeps gate's output (SiLU's input),
    silu(gate) and up's output. A 4-bit base linear saves no input; a LoRA layer keeps its input for lora_A
    (shared by q/k/v, by gate/up) and lora_A's (S, r) output; with dropout, each target keeps its own dropped
    copy and a 1-byte bool mask (CUDA's fused dropout; the CPU keeps a bf16 mask instead).
    Backward, at the larger of two moments, plus the grad arriving at the layer's output. MLP: the product's
    incoming grad and the grads of its two factors, or the incoming grad + down_proj's dequantized weight held
    for its matmul. Attention (MLP freed): flash's grads of q, k, v, of its output, and its fp32 dq accumulator.
    """
    attn = S * H * 4 + S * (2 * q + 2 * kv) * dt + SH_lse * 4
    mlp = S * H * 4 + 3 * S * I * dt
    for group, size, is_attn in ((GROUPS["qkv"], S * H, True), (GROUPS["gate_up"], S * H, False),
                                 (GROUPS["down"], S * I, False)):
        if dropout == 0 and any(t in targets for t in group):
            attn, mlp = (attn + size * dt, mlp) if is_attn else (attn, mlp + size * dt)
    for t in targets:
        extra = S * r * dt + (S * lin[t][0] * (dt + 1) if dropout > 0 else 0)
        attn, mlp = (attn + extra, mlp) if t in GROUPS["qkv"] + GROUPS["o"] else (attn, mlp + extra)
    mlp_moment = S * I * dt + max(2 * S * I * dt, I * H * dt)
    attn_moment = -mlp + S * (2 * q + 2 * kv) * dt + S * q * 4
    return {"saved": attn + mlp, "transient": max(mlp_moment, attn_moment) + S * H * dt}


def _fast_layer(S, SH_lse, H, I, q, kv, dt, r, targets, lin, dropout, deq=False, split=False, recomputed=False):
    """{"saved", "transient", "halves"} bytes of one fast layer (minilora/kernels/layer.py), as its code keeps
    them; "halves" holds (saved, transient) of the attention and the MLP half alone.

    Saved: each RMSNorm its input and an fp32 (S, 1) 1/rms; attention one (S, q + 2 kv) tensor of rotated q, k
    and v, its output and the fp32 logsumexp; SwiGLU the (S, 2I) gate/up output; and per projection with LoRA:
    its input (shared by the members without dropout; o_proj's is attention's output, already kept), or per
    member with dropout a dropped copy and a 1-byte bool mask, and each member's (S, r) x A^T.
    Backward, at the largest of its moments, each with the incoming grad. MLP: down's input grad (S, I) beside
    its dequantized weight; the SwiGLU backward, in place; gate/up's input grad beside their weights.
    Attention: o's input grad beside its weight; attention's q, k, v grads and flash's fp32 dq accumulator;
    RoPE's; q/k/v's input grad beside their weights. deq: the weights are dequantized (not cached, not kept
    from the recompute); split: one member's weight at a time. recomputed: the recompute's forward also
    allocates o's and down's (S, H) outputs beside their weights, with the incoming grad already there.
    """
    norm = S * (H * dt + 4)
    attn_saved = norm + S * (q + 2 * kv) * dt + SH_lse * 4 + S * q * dt
    mlp_saved = norm + 2 * S * I * dt
    for name, group in GROUPS.items():
        members = [t for t in group if t in targets]
        n_in = lin[group[0]][0]
        extra = 0
        if not members:
            continue
        if dropout > 0:
            extra += len(members) * S * n_in * (dt + 1)
        elif name != "o":
            extra += S * n_in * dt
        extra += len(members) * S * r * dt
        if name in ("qkv", "o"):
            attn_saved += extra
        else:
            mlp_saved += extra
    w = {name: (max if split else sum)(lin[t][0] * lin[t][1] for t in group) * dt if deq else 0
         for name, group in GROUPS.items()}
    g, qkv = S * H * dt, S * (q + 2 * kv) * dt  # g: the grad arriving at the layer's output (and the residual's)
    out = S * H * dt if recomputed else 0
    mlp = max(g + S * I * dt + w["down"] + out, 2 * g + w["gate_up"])  # gu's grad is written over gu (saved)
    attn = max(g + max(S * q * dt, out) + w["o"], g + S * q * (dt + 4) + qkv, g + 2 * qkv, 2 * g + qkv + w["qkv"])
    return {"saved": attn_saved + mlp_saved, "transient": max(mlp, attn),
            "halves": [(attn_saved, attn), (mlp_saved, mlp)]}


def choose_plan(config, batch, seq_len, budget: float, fixed: dict | None = None, **kw) -> dict:
    """The fastest fast-layer options whose predicted peak fits `budget` bytes, and their plan.

    From the leanest (every layer checkpointed, nothing cached; offloaded only if nothing else fits, since
    the copies and the split dequantizations cost some time), memory is spent in the order that saves the
    most time per byte at a guanaco-like step: the recompute keeps its dequantized weights for the backward
    (keep_weights: one dequantization fewer per weight, a layer's weights once), then layers keep their
    weights dequantized for good (cached_layers: no dequantization at all), then layers stop checkpointing
    (no recompute). All this with the smallest loss chunk; then the chunk grows while the peak stays put.
    If even the leanest does not fit, it is returned with "fits": False. fixed: options decided by the caller
    (e.g. {"gradient_checkpointing": 32}), left as they are. kw: the rest of plan_memory's arguments (lora_r,
    lora_targets, quant, lora_dropout, ...).
    """
    L = (SimpleNamespace(**config) if isinstance(config, dict) else config).num_hidden_layers
    fixed = fixed or {}
    opts = dict(fast=True, gradient_checkpointing=L, cached_layers=0, keep_weights=False, offload=False,
                loss_chunk=LOSS_CHUNKS[-1])

    def plan(**change):
        return plan_memory(config, batch, seq_len, **{**kw, **opts, **change, **fixed})

    def fits(**change):
        return plan(**change)["total"] <= budget

    if not fits() and "offload" not in fixed and fits(offload=True):
        opts["offload"] = True  # the leanest: checkpointed inputs and the embedding table in host memory
    if fits():
        if fits(keep_weights=True):
            opts["keep_weights"] = True
        opts["cached_layers"] = max(n for n in range(L + 1) if fits(cached_layers=n))
        opts["gradient_checkpointing"] = min(n for n in range(L + 1) if fits(gradient_checkpointing=n))
        # Larger chunks launch fewer, larger GEMMs, but the loss should not become the peak where memory is
        # tight: the largest chunk that fits and leaves the peak where it was (or a peak well inside the budget).
        floor = plan()["total"]
        opts["loss_chunk"] = next(c for c in LOSS_CHUNKS if fits(loss_chunk=c) and (
            plan(loss_chunk=c)["total"] <= max(floor, 0.9 * budget)))
    result = plan()
    return {"options": {k: v for k, v in {**opts, **fixed}.items() if k != "fast"}, "plan": result, "budget": budget,
            "fits": result["total"] <= budget}


def format_plan(plan) -> str:
    """A readable table of a plan_memory result, in GiB."""
    rows = [f"{k:<18}{v / GiB:>9.3f}" for k, v in plan["breakdown"].items()]
    other = next(k for k in plan["phases"] if k != plan["phase"])
    return "\n".join([f"{'term':<18}{'GiB':>9}", *rows, "-" * 27,
                      f"{'total (peak)':<18}{plan['total'] / GiB:>9.3f}",
                      f"peak during {plan['phase']}; the {other} moment's transients: {plan['phases'][other] / GiB:.3f} GiB",
                      f"+ pinned host memory {plan['cpu'] / GiB:.3f} GiB; + CUDA context ~{plan['cuda_context'] / GiB:.2f} "
                      "GiB outside torch's counters"])
