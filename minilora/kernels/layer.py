"""minilora's training forward of a LLaMA model: the same weights and formula as transformers' in fewer kernels.

transformers' LlamaForCausalLM stays the model definition: checkpoints, generation and the PEFT comparison use
it as it is. prepare_for_training(fast=True) gives every decoder layer a FastLayer, and minilora's loss then
runs the decoder through `model_forward` instead. Per layer it launches about a third of the plain path's
kernels and keeps fewer activations:
- q, k, v are one GEMM over their stacked weights (one dequantization pass), and so are gate and up; LoRA
  terms and the residual adds land in GEMM epilogues (lora4bit.Projection);
- RoPE rotates q and k in one pass and copies v beside them, so attention keeps one (B, T, heads, hd) tensor
  and the projection's output is freed;
- attention is SDPA with is_causal and no mask for right-padded rows (a causal model never looks right, so
  padding needs no mask), on flash attention (no per-shape plan), or cuDNN's from LONG_ATTENTION tokens a row;
- SwiGLU keeps only gate and up (one tensor) for its backward, where autograd would also keep silu(gate);
- RMSNorm keeps x and its fp32 1/rms only, and runs torch's fused kernels on CUDA.
The memory plan decides per layer whether its weights stay dequantized for good (`cache`), whether it is
checkpointed, and whether its recompute keeps the weights for the backward (`keep`); see lora4bit.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import swiglu
from .lora4bit import Projection, compute_dtype
from .offload import Offload

# cuDNN attention builds a plan for every new sequence length (about 3 ms of host time a call), which short
# batches of changing lengths cannot afford; flash attention needs none, and the others cover what flash cannot
# run. From LONG_ATTENTION tokens a row the attention's compute dwarfs that, and cuDNN's Hopper kernels run it
# faster than flash's: on an H100, 4% faster steps at 2 x 2048, 25% at 1 x 32768, but 18% slower at 4 x 512
# (benchmarks/NOTES.md).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
LONG_ATTENTION = 2048
# From KEEP_ATTENTION tokens a row, an offloaded attention unit also sends attention's output and logsumexp to
# the host, and its recompute runs no attention forward: on an H100, steps 0.8% faster at 2 x 2048, 4% at
# 1 x 8192, 10% at 1 x 32768, for one more (B, T, H) tensor a layer in host memory (benchmarks/NOTES.md).
KEEP_ATTENTION = 2048


def attention_backends(seq_len: int):
    """SDPA's backends, in priority order, for rows of seq_len tokens."""
    first = [SDPBackend.CUDNN_ATTENTION] if seq_len >= LONG_ATTENTION else []
    return sdpa_kernel(first + ATTENTION_BACKENDS, set_priority=True)


class FastLayer:
    """How one LlamaDecoderLayer trains: its projections, built from its own (LoRA, 4-bit) modules, and
    whether it is checkpointed (its input kept, the rest recomputed in the backward).

    offload: the lean mode. The layer is checkpointed as two units, attention and MLP, whose inputs wait in
    pinned host memory (kernels/offload.py), and projections dequantize their members' weights one at a time:
    the backward then holds one half's activations and one member's weight at a time. From KEEP_ATTENTION
    tokens a row the attention unit also offloads attention's output, which its recompute then reuses.
    """

    def __init__(self, layer: torch.nn.Module, cache=False, keep=False, checkpoint=False, offload=False):
        att, mlp = layer.self_attn, layer.mlp
        split = offload and not cache and not keep
        self.qkv = Projection([att.q_proj, att.k_proj, att.v_proj], cache, keep, split)
        self.o = Projection([att.o_proj], cache, keep)
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj], cache, keep, split)
        self.down = Projection([mlp.down_proj], cache, keep)
        self.checkpoint, self.offload = checkpoint, offload and checkpoint
        # the LoRA weights of each unit, which a checkpointed unit's single autograd node must name as inputs
        self.params = {part: [w for p in projections for _, m in p.loras for w in (m.lora_A.weight, m.lora_B.weight)]
                       for part, projections in ((attention_block, (self.qkv, self.o)),
                                                 (mlp_block, (self.gate_up, self.down)))}
        self.params[layer_forward] = self.params[attention_block] + self.params[mlp_block]


def unsupported(config) -> str | None:
    """Why the fast layer cannot run this config, or None when it can."""
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not 'llama'"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not 'silu'"
    if getattr(config, "attention_dropout", 0.0):
        return f"attention_dropout {config.attention_dropout} is not 0"
    return None


def is_fast(model) -> bool:
    return "_minilora_fast" in model.model.layers[0].__dict__


def host_embedding(model) -> torch.Tensor | None:
    """The embedding table, when prepare_for_training(offload=True) keeps it in host memory (the rest of the
    model on a GPU); else None."""
    w = model.model.embed_tokens.weight
    return w if w.device.type == "cpu" and model.lm_head.weight.is_cuda else None


def model_forward(model, input_ids, attention_mask=None, position_ids=None, inputs_embeds=None) -> torch.Tensor:
    """The final-norm hidden states (B, T, H) of a LlamaForCausalLM prepared with fast=True.

    attention_mask: None for right-padded rows (causal attention is exact for them), or a boolean
    (B, 1, T, T) mask, True where a query may attend (the Collator's packed rows). inputs_embeds: the
    embedded input_ids, gathered on the host when the table is there (loss.to_device does it).
    """
    inner = model.model
    if inputs_embeds is None:
        table = host_embedding(model)
        ids = input_ids if table is None else input_ids.cpu()  # a host table: gather there, then copy
        inputs_embeds = inner.embed_tokens(ids).to(model.lm_head.weight.device)  # (B, T, H)
    h = inputs_embeds.to(compute_dtype(inputs_embeds))
    if position_ids is None:
        position_ids = torch.arange(h.shape[1], device=h.device)[None]
    cos, sin = (t.to(h.dtype)[:, :, None] for t in inner.rotary_emb(h, position_ids))  # (1 or B, T, 1, hd)
    offload = Offload(h.device) if torch.is_grad_enabled() and any(
        layer._minilora_fast.offload for layer in inner.layers) else None
    with attention_backends(h.shape[1]):
        h = _layers(inner.layers, h, cos, sin, attention_mask, offload)
    return _rms_norm(h, inner.norm)


def _layers(layers, h, cos, sin, attention_mask, offload):
    for layer in layers:
        fast = layer._minilora_fast
        if not (fast.checkpoint and torch.is_grad_enabled()):
            h = layer_forward(layer, h, cos, sin, attention_mask)
            continue
        for part in (attention_block, mlp_block) if fast.offload else (layer_forward,):
            h = Recomputed.apply(h, layer, cos, sin, attention_mask, part, offload if fast.offload else None,
                                 *fast.params[part])
    return h


class Recomputed(torch.autograd.Function):
    """A checkpointed unit of a fast layer (`part`: the whole layer, or its attention or MLP half): the forward
    keeps only the unit's input (and the RNG state), on the GPU or, with `offload`, in host memory; the
    backward runs the unit again, with the same dropout masks, and backpropagates through that. An offloaded
    attention unit on rows of KEEP_ATTENTION tokens or more also keeps attention's output (`KeptAttention`).

    One autograd node per unit, with its LoRA weights as inputs so that it is part of the graph even when x
    needs no gradient (the first layer's input). torch.utils.checkpoint's non-reentrant form instead routes
    every tensor the unit saves through saved-tensor hooks, which costs more host time than the unit's own
    forward. A projection that keeps its weights (`Projection.keep`) saves them only in the recompute, which
    lives until this node's backward ends.
    """

    @staticmethod
    def forward(ctx, x, layer, cos, sin, mask, part, offload, *params):
        ctx.layer, ctx.mask, ctx.part, ctx.offload = layer, mask, part, offload
        ctx.rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        if offload:
            ctx.slot = offload.save(x)
        else:
            ctx.save_for_backward(x)
        ctx.cos_sin = cos, sin  # shared by every layer: not saved (nor offloaded) per layer
        keep = [] if offload and part is attention_block and x.shape[1] >= KEEP_ATTENTION else None
        with torch.no_grad():
            y = part(layer, x, cos, sin, mask, keep)
        ctx.state = None
        if keep:  # attention's output and logsumexp go with x; the backend's small state stays here
            o, lse, ctx.state = keep[0]
            offload.add(ctx.slot, o, lse)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, *kept = ctx.offload.load(ctx.slot) if ctx.offload else ctx.saved_tensors
        cos, sin = ctx.cos_sin
        params = ctx.layer._minilora_fast.params[ctx.part]
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), attention_backends(x.shape[1]), \
                torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            (torch.cuda.set_rng_state(ctx.rng, x.device) if x.is_cuda else torch.set_rng_state(ctx.rng))
            x_ = x.detach().requires_grad_(ctx.needs_input_grad[0])
            y = ctx.part(ctx.layer, x_, cos, sin, ctx.mask, [(*kept, ctx.state)] if kept else None)
            # The backward needs y's graph, not its values (no function saves its own output): free them now.
            y.untyped_storage().resize_(0)
            inputs = ([x_] if x_.requires_grad else []) + params
            grads = torch.autograd.grad(y, inputs, dy, allow_unused=True)
        dx = grads[0] if x_.requires_grad else None
        return dx, None, None, None, None, None, None, *grads[len(inputs) - len(params):]


def layer_forward(layer, x, cos, sin, attention_mask=None, keep=None):
    """One LlamaDecoderLayer through its FastLayer: x (B, T, H) -> (B, T, H), in x's (compute) dtype. (keep, for
    one signature with the halves: a whole checkpointed layer keeps no attention output.)"""
    return mlp_block(layer, attention_block(layer, x, cos, sin, attention_mask))


def attention_block(layer, x, cos, sin, attention_mask=None, keep=None):
    """x + attention(norm(x)): the layer's first half.

    keep: an empty list asks to keep attention's output: where the backend allows (causal rows, no mask, as
    many kv heads as q heads), (o, logsumexp, state) is appended to it. A list holding that runs the recompute
    of the same unit, whose attention then returns the kept output (KeptAttention).
    """
    fast: FastLayer = layer._minilora_fast
    att = layer.self_attn
    B, T, _ = x.shape
    hd, n_q, n_kv = att.head_dim, att.config.num_attention_heads, att.config.num_key_value_heads
    a = _rms_norm(x, layer.input_layernorm)
    q, k, v = Rope.apply(fast.qkv(a), cos, sin, n_q, n_kv)  # (B, heads, T, hd) each
    if keep:
        o = KeptAttention.apply(q, k, v, att.scaling, keep[0])
    elif keep is not None and attention_mask is None and n_kv == n_q and (kept := _attention(q, k, v, att.scaling)):
        keep.append(kept)
        o = kept[0]
    else:  # SDPA on the backends of attention_backends: the callers (model_forward, Recomputed) enter them
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
                                           scale=att.scaling, enable_gqa=n_kv != n_q)  # (B, n_q, T, hd)
    return fast.o(o.transpose(1, 2).reshape(B, T, n_q * hd), residual=x)  # x + attention, (B, T, H)


def mlp_block(layer, h, cos=None, sin=None, attention_mask=None, keep=None):
    """h + MLP(norm(h)): the layer's second half (the unused arguments keep one signature with the first)."""
    fast: FastLayer = layer._minilora_fast
    m = SwiGLU.apply(fast.gate_up(_rms_norm(h, layer.post_attention_layernorm)))  # (B, T, I)
    return fast.down(m, residual=h)


def _attention(q, k, v, scale):
    """Causal attention's output o (B, heads, T, hd), its fp32 logsumexp, and (backend, state) for
    KeptAttention's backward, from the backend SDPA would choose here; None where that backend has no such
    path here (then SDPA runs, and nothing is kept)."""
    backend = SDPBackend(torch.ops.aten._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale))
    if not q.is_cuda and backend == SDPBackend.FLASH_ATTENTION:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return o, lse, (backend, ())
    if q.is_cuda and backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION) and q.shape[-1] % 8 == 0:
        if backend == SDPBackend.CUDNN_ATTENTION:
            o, lse, *state, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True,
                                                                                    False, scale=scale)
        else:
            o, lse, *state, _ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                                                    scale=scale)
        return o, lse, (backend, state)  # state: cum_seq_q, cum_seq_k, max_q, max_k and the two RNG tensors
    return None


class KeptAttention(torch.autograd.Function):
    """Causal attention in the recompute of a unit that kept its output and logsumexp from the forward
    (`_attention`): returns that output, and the backward runs the same backend's backward on it with the
    recomputed q, k, v, which are bitwise those of the forward."""

    @staticmethod
    def forward(ctx, q, k, v, scale, kept):
        o, lse, ctx.state = kept
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        backend, state = ctx.state
        if not q.is_cuda:
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, o, lse, 0.0, True, scale=ctx.scale)
        elif backend == SDPBackend.CUDNN_ATTENTION:
            cum_q, cum_k, max_q, max_k, seed, offset = state
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                do, q, k, v, o, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=ctx.scale)
        else:
            cum_q, cum_k, max_q, max_k, seed, offset = state
            grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=ctx.scale)
        return *grads, None, None


def _rms_norm(x, norm):
    return RMSNorm.apply(x, norm.weight, norm.variance_epsilon)


# torch's own fused RMSNorm kernels, where this build has them for CUDA; otherwise the formula in plain ops
FUSED_RMS_NORM = all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
                     for op in ("aten::_fused_rms_norm", "aten::_fused_rms_norm_backward"))


class RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm, w * (x / rms(x)) computed in fp32, keeping only x and the (N, 1) fp32 1/rms for the
    backward (autograd through transformers' version also keeps fp32 copies of x). On CUDA it runs torch's
    fused kernels, one launch each way, where the build has them; elsewhere the same formula in plain ops."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        w = weight.to(x.dtype)
        if x.is_cuda and FUSED_RMS_NORM:
            y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], w, eps)
        else:
            xf = x.float()
            rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
            y = w * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, w)
        return y

    @staticmethod
    def backward(ctx, g):
        x, rstd, w = ctx.saved_tensors
        if x.is_cuda and FUSED_RMS_NORM:
            dx, _ = torch.ops.aten._fused_rms_norm_backward(g, x, [x.shape[-1]], rstd, w, [True, False])
            return dx, None, None
        n = x.float() * rstd  # x / rms(x)
        gn = (g * w).float()
        # d/dx of n = x * rstd: rstd * (gn - n * mean(gn * n))
        return (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype), None, None


class Rope(torch.autograd.Function):
    """q, k, v (B, heads, T, hd) from the qkv projection's (B, T, (n_q + 2 n_kv) hd) output, with the rotary
    embedding on q and k: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) over the two halves of hd.
    v is copied beside them, so the three are views of one new tensor and the projection's output is freed.
    Saves nothing but cos and sin, which every layer shares."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int):
        B, T, _ = qkv.shape
        x = qkv.view(B, T, n_q + 2 * n_kv, -1)  # (B, T, heads, hd)
        n_rot, half = n_q + n_kv, x.shape[-1] // 2
        out = torch.empty_like(x)
        xr, o = x[:, :, :n_rot], out[:, :, :n_rot]
        torch.mul(xr, cos, out=o)
        o[..., :half].addcmul_(xr[..., half:], sin[..., :half], value=-1)  # x1 c - x2 s
        o[..., half:].addcmul_(xr[..., :half], sin[..., half:])  # x2 c + x1 s
        out[:, :, n_rot:] = x[:, :, n_rot:]
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_q, n_kv)
        return tuple(t.transpose(1, 2) for t in out.split([n_q, n_kv, n_kv], dim=2))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        n_q, n_kv = ctx.heads
        B, _, T, hd = dq.shape
        half = hd // 2
        dx = torch.empty(B, T, n_q + 2 * n_kv, hd, dtype=dq.dtype, device=dq.device)  # (B, T, heads, hd)
        dq_, dk_, dv_ = dx.split([n_q, n_kv, n_kv], dim=2)
        for g, d in ((dq.transpose(1, 2), dq_), (dk.transpose(1, 2), dk_)):  # each grad rotated into its slot
            torch.mul(g, cos, out=d)
            d[..., :half].addcmul_(g[..., half:], sin[..., half:])  # dx1 = g1 c + g2 s
            d[..., half:].addcmul_(g[..., :half], sin[..., :half], value=-1)  # dx2 = g2 c - g1 s
        dv_.copy_(dv.transpose(1, 2))
        return dx.flatten(2), None, None, None, None


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the stacked (..., 2I) output of the gate/up projection; keeps only that input, and
    writes its gradient over it (kernels/swiglu.py)."""

    @staticmethod
    def forward(ctx, gu):
        ctx.save_for_backward(gu)
        return swiglu.forward(gu)

    @staticmethod
    def backward(ctx, dm):
        (gu,) = ctx.saved_tensors
        return swiglu.backward_(gu, dm.contiguous())
