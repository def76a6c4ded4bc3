"""Predict the peak GPU memory of one minilora QLoRA training step, before loading anything.

The peak is what `torch.cuda.max_memory_allocated` reports: persistent tensors (4-bit weights, adapters,
optimizer state) plus the larger of two transient moments of a step:
  "loss"      the chunked cross-entropy's forward, with every checkpoint still held;
  "backward"  the backward of the last decoder layer (the first recomputed), with every checkpoint still held.
The CUDA context (~0.5 GiB) lives outside PyTorch's counters; it is reported beside the total, not in it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

GiB = 2**30
CUBLAS_WORKSPACES = 2 * 32 * 2**20  # cuBLAS keeps a 32 MiB workspace per (thread, stream): forward + autograd thread
CUDA_CONTEXT = 512 * 2**20  # driver context + kernels; seen by nvidia-smi, not by torch's allocator counters
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}  # torch AdamW keeps exp_avg and exp_avg_sq, in each parameter's dtype


def _linears(c):
    """(in, out) features of each linear of one decoder layer."""
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * hd
    H, I = c.hidden_size, c.intermediate_size
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def plan_memory(config, batch, seq_len, lora_r=64, lora_targets=("q_proj", "v_proj"), quant="nf4",
                double_quant=True, compute_dtype=torch.bfloat16, gradient_checkpointing=True, offload=False,
                loss_chunk=4096, optimizer="adamw", print_breakdown=False, lora_dropout=0.0, lora_dtype=None):
    """Peak allocated bytes of a step of `minilora.train`'s loop (labels on every token), itemised.

    config: a LlamaConfig, a dict or anything with its fields. Returns a dict: `breakdown` {term: bytes},
    `total` (their sum, the predicted peak), `phase` (the moment it happens), `phases` (both candidates'
    transient bytes), `cpu` (pinned host bytes when offloading) and `cuda_context` (outside `total`).
    """
    c = SimpleNamespace(**config) if isinstance(config, dict) else config
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer={optimizer!r}; plan_memory knows {sorted(OPTIMIZER_STATES)}")
    lin = _linears(c)
    targets = [lora_targets] if isinstance(lora_targets, str) else list(lora_targets)
    if bad := [t for t in targets if t not in lin]:
        raise ValueError(f"lora_targets {bad} are not decoder-layer linears; use names from {list(lin)}")
    dt, ldt = compute_dtype.itemsize, (lora_dtype or compute_dtype).itemsize
    L, H, I, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    nh, q, kv = c.num_attention_heads, lin["q_proj"][1], lin["k_proj"][1]
    B, T = batch, seq_len
    S, N = B * T, B * (T - 1)  # tokens through the decoder; supervised rows (position t predicts token t+1)
    b = {}

    # Frozen base. 4-bit: two weights per byte. Quant state: one absmax per 64-block, fp32; with double quant
    # that absmax is itself 8-bit (1 byte per 64 weights) plus an fp32 absmax per 256 of those and a 256-entry
    # fp32 code per weight. quant=None keeps every linear in the compute dtype (4x the 4-bit bytes for bf16).
    sizes = [i * o for i, o in lin.values()] * L
    if quant is None:
        b["weights"], b["quant_state"] = sum(sizes) * dt, 0
    else:
        b["weights"] = sum(math.ceil(n / 2) for n in sizes)
        b["quant_state"] = sum(n // 64 + 4 * math.ceil(n / 64 / 256) + 1024 if double_quant else 4 * (n // 64)
                               for n in sizes)
    # Embeddings and lm_head stay in the compute dtype (no fp32 upcast); one matrix if they are tied.
    b["embed_lm_head"] = V * H * dt * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    b["norms"] = (2 * L + 1) * H * dt  # two RMSNorm weights per layer and the final one
    # LoRA: A (r, in) and B (out, r) per target per layer, in the adapters' dtype; AdamW's two states likewise.
    P = L * sum(lora_r * (lin[t][0] + lin[t][1]) for t in targets)
    b["lora"] = P * ldt
    b["optimizer"] = OPTIMIZER_STATES[optimizer] * P * ldt
    b["cublas_workspace"] = CUBLAS_WORKSPACES

    # What one decoder layer's forward leaves for its backward (autograd's saved tensors), bf16 autocast, SDPA:
    # each RMSNorm keeps an fp32 copy of its input (HF's LlamaRMSNorm upcasts); SDPA keeps q, k, v, its
    # output (which is also o_proj's input) and an fp32 logsumexp per head and row (flash: no T x T matrix);
    # the MLP keeps gate's output (SiLU's input), silu(gate) and up's output (the product's factors). A 4-bit
    # base linear saves no input (it only needs the weight); a LoRA layer keeps its input for lora_A (shared by
    # q/k/v, by gate/up) and lora_A's (S, r) output; with dropout, each target keeps its own dropped copy and
    # a 1-byte bool mask (CUDA's fused dropout; the CPU keeps a bf16 mask instead).
    attn = S * H * 4 + S * (2 * q + 2 * kv) * dt + B * nh * T * 4
    mlp = S * H * 4 + 3 * S * I * dt
    for group, size, is_attn in ((("q_proj", "k_proj", "v_proj"), S * H, True), (("gate_proj", "up_proj"), S * H, False),
                                 (("down_proj",), S * I, False)):
        if lora_dropout == 0 and any(t in targets for t in group):
            attn, mlp = (attn + size * dt, mlp) if is_attn else (attn, mlp + size * dt)
    for t in targets:
        extra = S * lora_r * dt + (S * lin[t][0] * (dt + 1) if lora_dropout > 0 else 0)
        attn, mlp = (attn + extra, mlp) if t in ("q_proj", "k_proj", "v_proj", "o_proj") else (attn, mlp + extra)
    # Backward temporaries, at the larger of two moments. MLP: the product's incoming grad and the grads of its
    # two factors (3 x S*I), or the incoming grad + down_proj's dequantized bf16 weight (I x H) held for its
    # matmul. Attention (MLP freed): flash's grads of q, k, v, of its output, and its fp32 dq accumulator.
    mlp_moment = attn + mlp + S * I * dt + max(2 * S * I * dt, I * H * dt)
    attn_moment = attn + S * (2 * q + 2 * kv) * dt + S * q * 4
    layer = max(mlp_moment, attn_moment) + S * H * dt  # + the grad arriving at the layer's output

    # Checkpoints: each layer's (B, T, H) input, in the compute dtype. With offload they sit in pinned host
    # memory and one at a time comes back. Without checkpointing, every layer keeps its full saved set.
    cpu = L * S * H * dt if gradient_checkpointing and offload else 0
    if gradient_checkpointing:
        stored = S * H * dt if offload else L * S * H * dt
    else:
        stored, layer = L * (attn + mlp), layer - attn - mlp
    # Loss (minilora.loss): the final norm's fp32 copy and bf16 output, the (N, H) supervised rows and their
    # gradient (computed in the forward), and per chunk of n = min(N, loss_chunk) rows: the fp32 logits and
    # one transient beside them (the bf16 matmul output, then the bf16 softmax gradient), counted at 8 bytes
    # a logit, which over-predicts the measured H100 peaks by 2-5%.
    n = min(N, loss_chunk)
    loss = S * H * (4 + dt) + 2 * N * H * dt + n * V * max(8, 4 + dt)
    phases = {"loss": loss, "backward": layer + P * ldt}  # the backward moment also holds every LoRA grad
    phase = max(phases, key=phases.get)
    b["activations"] = stored
    b["lora_grads"] = P * ldt if phase == "backward" else 0
    b["layer_backward"] = layer if phase == "backward" else 0
    b["loss"] = loss if phase == "loss" else 0
    plan = {"breakdown": b, "total": sum(b.values()), "phase": phase, "phases": phases, "cpu": cpu,
            "cuda_context": CUDA_CONTEXT, "inputs": dict(batch=B, seq_len=T, lora_r=lora_r, lora_targets=targets,
                                                           quant=quant, offload=offload, lora_dropout=lora_dropout)}
    if print_breakdown:
        print(format_plan(plan))
    return plan


def format_plan(plan) -> str:
    """A readable table of a plan_memory result, in GiB."""
    rows = [f"{k:<18}{v / GiB:>9.3f}" for k, v in plan["breakdown"].items()]
    other = next(k for k in plan["phases"] if k != plan["phase"])
    return "\n".join([f"{'term':<18}{'GiB':>9}", *rows, "-" * 27,
                      f"{'total (peak)':<18}{plan['total'] / GiB:>9.3f}",
                      f"peak during {plan['phase']}; the {other} moment's transients: {plan['phases'][other] / GiB:.3f} GiB",
                      f"+ pinned host memory {plan['cpu'] / GiB:.3f} GiB; + CUDA context ~{plan['cuda_context'] / GiB:.2f} "
                      "GiB outside torch's counters"])
