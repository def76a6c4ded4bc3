"""The byte models for minilora.plan: the sizes of a training step, what one decoder layer's autograd keeps for the
backward ("saved") and allocates beside it there ("transient"), for transformers' decoder layer and for
minilora's fast one (minilora/kernels/layer.py), and the optimizer's state."""

from __future__ import annotations

import math

from dataclasses import dataclass

# TrainConfig.optimizer's bitsandbytes choices, as step.make_optimizer builds them: (8-bit states, paged states)
BNB_OPTIMIZERS = {"adamw_8bit": (True, False), "paged_adamw_8bit": (True, True), "paged_adamw": (False, True)}
# bitsandbytes 0.50's Optimizer2State (optim/optimizer.py): a tensor of fewer than BNB_MIN_8BIT entries keeps fp32
# states (min_8bit_size's default); an 8-bit state has an fp32 absmax per BNB_BLOCK entries (init_state); a paged
# optimizer pages the states of tensors of BNB_MIN_PAGED entries or more (get_state_buffer)
BNB_MIN_8BIT, BNB_BLOCK, BNB_MIN_PAGED = 4096, 256, 10**5
BNB_QMAPS = 2 * 256 * 4  # the signed and unsigned 8-bit quantization maps, 256 fp32 each, shared by every tensor
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}  # the projections of the fast layer: linears that read one input


def linear_shapes(c) -> dict:
    """(in, out) features of each linear of one decoder layer of the config c."""
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * hd
    H, I = c.hidden_size, c.intermediate_size
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


@dataclass(frozen=True)
class StepSizes:
    """The sizes of one training step that the plan reads: the batch, the model's widths, the adapter."""

    B: int  # rows of the batch
    T: int  # tokens a row
    H: int  # hidden size
    I: int  # intermediate (MLP) size
    V: int  # vocabulary size
    L: int  # decoder layers
    heads: int  # attention (query) heads
    q: int  # q_proj's output features
    kv: int  # k_proj's (and v_proj's) output features
    dt: int  # bytes per element of the compute dtype
    ldt: int  # bytes per element of the adapters' dtype
    r: int  # LoRA rank
    targets: list  # the linears with LoRA
    lin: dict  # (in, out) features of each linear of one decoder layer
    dropout: float  # LoRA dropout
    dora: bool = False  # DoRA: a magnitude per output feature of each target

    @property
    def S(self) -> int:
        """Tokens through the decoder."""
        return self.B * self.T

    @property
    def N(self) -> int:
        """Supervised rows (position t predicts token t+1)."""
        return self.B * (self.T - 1)

    @property
    def lse(self) -> int:
        """Entries of attention's logsumexp: one per head and row."""
        return self.B * self.heads * self.T

    @property
    def layer_weights(self) -> int:
        """Bytes of one layer's linears, dequantized."""
        return self.weights_of(GROUPS)

    def weights_of(self, groups) -> int:
        """Bytes of the dequantized linears in these GROUPS of one layer."""
        return sum(self.lin[t][0] * self.lin[t][1] for g in groups for t in GROUPS[g]) * self.dt

    @property
    def layer_lora(self) -> int:
        """Adapter parameters of one layer: A (r, in) and B (out, r) per target, and DoRA's magnitude (out,)."""
        return sum(self.r * (self.lin[t][0] + self.lin[t][1]) + self.dora * self.lin[t][1] for t in self.targets)

    @property
    def dora_transient(self) -> int:
        """A DoRA target's forward, at its largest: its weight, dequantized for the norm, and W + s B A."""
        return max((2 * self.lin[t][0] * self.lin[t][1] * self.dt for t in self.targets), default=0) * self.dora

    @property
    def lora_bytes(self) -> int:
        """Bytes of every layer's adapters, in their dtype (and of their grads)."""
        return self.L * self.layer_lora * self.ldt


def _lora_saved(z: StepSizes, dora_copies: int = 1) -> tuple[int, int]:
    """(attention half, MLP half): the bytes the LoRA layers of one decoder layer keep for the backward, the
    same in transformers' layer and the fast one. Per projection with LoRA: its input for lora_A, shared by its
    members (o_proj's is attention's output, kept already), or with dropout each member's own dropped copy and a
    1-byte bool mask; and each member's (S, r) output of lora_A."""
    saved = {"attn": 0, "mlp": 0}
    for name, group in GROUPS.items():
        members = sum(t in z.targets for t in group)
        n_in = z.S * z.lin[group[0]][0]  # elements of the projection's input
        shared = n_in * z.dt if members and name != "o" else 0
        kept = members * n_in * (z.dt + 1) if z.dropout > 0 else shared
        # DoRA's rescale keeps, for its magnitude's gradient, each member's (S, out) rows before it: the fast
        # layer their sum (x W^T + s x A^T B^T, or with dropout the dropped input's), LoRALinear both terms
        rescaled = z.dora * dora_copies * sum(z.S * z.lin[t][1] * z.dt for t in group if t in z.targets)
        saved["attn" if name in ("qkv", "o") else "mlp"] += kept + members * z.S * z.r * z.dt + rescaled
    return saved["attn"], saved["mlp"]


def hf_layer_bytes(z: StepSizes) -> dict:
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
    S, H, I, q, kv, dt = z.S, z.H, z.I, z.q, z.kv, z.dt
    lora_attn, lora_mlp = _lora_saved(z, dora_copies=2)
    attn = S * H * 4 + S * (2 * q + 2 * kv) * dt + z.lse * 4 + lora_attn
    mlp = S * H * 4 + 3 * S * I * dt + lora_mlp
    mlp_moment = S * I * dt + max(2 * S * I * dt, I * H * dt)
    attn_moment = -mlp + S * (2 * q + 2 * kv) * dt + S * q * 4
    return {"saved": attn + mlp, "transient": max(mlp_moment, attn_moment) + S * H * dt + z.dora_transient}


def fast_layer_bytes(z: StepSizes, deq=False, split=False) -> dict:
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
    from the recompute); split: one member's weight at a time. A recompute allocates no output for o and down,
    nor down's input (kernels/layer.Recomputed): nothing beyond the forward's saved set.
    """
    S, H, I, q, kv, dt = z.S, z.H, z.I, z.q, z.kv, z.dt
    norm = S * (H * dt + 4)
    lora_attn, lora_mlp = _lora_saved(z)
    attn_saved = norm + S * (q + 2 * kv) * dt + z.lse * 4 + S * q * dt + lora_attn
    mlp_saved = norm + 2 * S * I * dt + lora_mlp
    w = {name: (max if split else sum)(z.lin[t][0] * z.lin[t][1] for t in group) * dt if deq else 0
         for name, group in GROUPS.items()}
    g, qkv = S * H * dt, S * (q + 2 * kv) * dt  # g: the grad arriving at the layer's output (and the residual's)
    mlp = max(g + S * I * dt + w["down"], 2 * g + w["gate_up"])  # gu's grad is written over gu (saved)
    attn = max(g + S * q * dt + w["o"], g + S * q * (dt + 4) + qkv, g + 2 * qkv, 2 * g + qkv + w["qkv"])
    dora = z.dora_transient  # a DoRA target's recompute forward, beside the half's saved set
    return {"saved": attn_saved + mlp_saved, "transient": max(mlp, attn) + dora,
            "halves": [(attn_saved, attn + dora), (mlp_saved, mlp + dora)]}


def optimizer_bytes(z: StepSizes, optimizer: str) -> tuple[int, int]:
    """(bytes in torch's allocator, bytes paged) of the optimizer's state for every adapter tensor.

    torch's AdamW: exp_avg and exp_avg_sq in the tensor's dtype and an fp32 step count (on the GPU when fused).
    bitsandbytes (Optimizer2State.init_state): two fp32 states whatever the tensor's dtype, or, 8-bit, two uint8
    states with an fp32 absmax per block each (tensors under BNB_MIN_8BIT entries keep fp32 ones), and one pair of
    quantization maps. A paged optimizer puts each state of BNB_MIN_PAGED entries or more in CUDA managed memory
    (functional.get_paged: cudaMallocManaged), which torch's allocator never sees; the other states, the absmax
    and the maps stay in torch's allocator.
    """
    # entries of each A (r, in) and B (out, r), and of DoRA's magnitude (out,)
    sizes = [n for t in z.targets for n in (z.r * z.lin[t][0], z.r * z.lin[t][1], *[z.lin[t][1]] * z.dora)] * z.L
    if optimizer == "adamw":
        return 2 * z.lora_bytes + 4 * len(sizes), 0
    eight_bit, paged = BNB_OPTIMIZERS[optimizer]
    held = outside = 0
    for n in sizes:
        quantized = eight_bit and n >= BNB_MIN_8BIT
        states = 2 * n * (1 if quantized else 4)  # state1 and state2, uint8 or fp32
        if paged and n >= BNB_MIN_PAGED:
            outside += states
        else:
            held += states
        held += 2 * 4 * math.ceil(n / BNB_BLOCK) if quantized else 0  # absmax1 and absmax2, fp32
    maps = BNB_QMAPS if eight_bit and any(n >= BNB_MIN_8BIT for n in sizes) else 0  # once, by the first 8-bit one
    return held + maps, outside
