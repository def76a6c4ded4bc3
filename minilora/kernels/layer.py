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
  padding needs no mask), on flash attention: no per-shape plan, unlike cuDNN's;
- SwiGLU keeps only gate and up (one tensor) for its backward, where autograd would also keep silu(gate);
- RMSNorm keeps x and its fp32 1/rms only, and runs torch's fused kernels on CUDA.
The memory plan decides per layer whether its weights stay dequantized for good (`cache`), whether it is
checkpointed, and whether its recompute keeps the weights for the backward (`keep`); see lora4bit.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .lora4bit import Projection, compute_dtype

# cuDNN attention, SDPA's first choice on Hopper, builds a plan for every new sequence length (about 3 ms of
# host time a call); flash attention needs none, and the others cover what flash cannot run.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class FastLayer:
    """How one LlamaDecoderLayer trains: its projections, built from its own (LoRA, 4-bit) modules, and
    whether it is checkpointed (its input kept, the rest recomputed in the backward; `offload`: that input
    kept in pinned CPU memory)."""

    def __init__(self, layer: torch.nn.Module, cache=False, keep=False, checkpoint=False, offload=False):
        att, mlp = layer.self_attn, layer.mlp
        self.qkv = Projection([att.q_proj, att.k_proj, att.v_proj], cache, keep)
        self.o = Projection([att.o_proj], cache, keep)
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj], cache, keep)
        self.down = Projection([mlp.down_proj], cache, keep)
        self.checkpoint, self.offload = checkpoint, offload
        # the LoRA weights, which a checkpointed layer's single autograd node must name as its inputs
        self.params = [w for p in (self.qkv, self.o, self.gate_up, self.down) for _, m in p.loras
                       for w in (m.lora_A.weight, m.lora_B.weight)]


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


def model_forward(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """The final-norm hidden states (B, T, H) of a LlamaForCausalLM prepared with fast=True.

    attention_mask: None for right-padded rows (causal attention is exact for them), or a boolean
    (B, 1, T, T) mask, True where a query may attend (the Collator's packed rows).
    """
    inner = model.model
    h = inner.embed_tokens(input_ids)  # (B, T, H)
    h = h.to(compute_dtype(h))
    if position_ids is None:
        position_ids = torch.arange(h.shape[1], device=h.device)[None]
    cos, sin = (t.to(h.dtype)[:, :, None] for t in inner.rotary_emb(h, position_ids))  # (1 or B, T, 1, hd)
    with sdpa_kernel(ATTENTION_BACKENDS):
        h = _layers(inner.layers, h, cos, sin, attention_mask)
    return _rms_norm(h, inner.norm)


def _layers(layers, h, cos, sin, attention_mask):
    for layer in layers:
        fast = layer._minilora_fast
        if fast.checkpoint and torch.is_grad_enabled():
            # offload: the one tensor the layer saves, its input, waits in pinned CPU memory (saved through
            # autograd's saved-tensor hooks, so save_on_cpu moves just it)
            with torch.autograd.graph.save_on_cpu(pin_memory=h.is_cuda) if fast.offload else contextlib.nullcontext():
                h = Recomputed.apply(h, layer, cos, sin, attention_mask, *fast.params)
        else:
            h = layer_forward(layer, h, cos, sin, attention_mask)
    return h


class Recomputed(torch.autograd.Function):
    """A checkpointed fast layer: the forward keeps only the layer's input (and the RNG state); the backward
    runs the layer again, with the same dropout masks, and backpropagates through that.

    One autograd node for the whole layer, with the LoRA weights as inputs so that it is part of the graph
    even when x needs no gradient (the first layer's input). torch.utils.checkpoint's non-reentrant form
    instead routes every tensor the layer saves through saved-tensor hooks, which costs more host time than
    the layer's own forward. A projection that keeps its weights (`Projection.keep`) saves them only in the
    recompute, which lives until this node's backward ends.
    """

    @staticmethod
    def forward(ctx, x, layer, cos, sin, mask, *params):
        ctx.layer, ctx.mask = layer, mask
        ctx.rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x)
        ctx.cos_sin = cos, sin  # shared by every layer: not saved (nor offloaded) per layer
        with torch.no_grad():
            return layer_forward(layer, x, cos, sin, mask)

    @staticmethod
    def backward(ctx, dy):
        (x,), (cos, sin) = ctx.saved_tensors, ctx.cos_sin
        params = ctx.layer._minilora_fast.params
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), sdpa_kernel(ATTENTION_BACKENDS), \
                torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            (torch.cuda.set_rng_state(ctx.rng, x.device) if x.is_cuda else torch.set_rng_state(ctx.rng))
            x_ = x.detach().requires_grad_(ctx.needs_input_grad[0])
            y = layer_forward(ctx.layer, x_, cos, sin, ctx.mask)
            inputs = ([x_] if x_.requires_grad else []) + params
            grads = torch.autograd.grad(y, inputs, dy, allow_unused=True)
        dx = grads[0] if x_.requires_grad else None
        return dx, None, None, None, None, *grads[len(inputs) - len(params):]


def layer_forward(layer, x, cos, sin, attention_mask=None):
    """One LlamaDecoderLayer through its FastLayer: x (B, T, H) -> (B, T, H), in x's (compute) dtype."""
    fast: FastLayer = layer._minilora_fast
    att = layer.self_attn
    B, T, _ = x.shape
    hd, n_q, n_kv = att.head_dim, att.config.num_attention_heads, att.config.num_key_value_heads

    a = _rms_norm(x, layer.input_layernorm)
    q, k, v = Rope.apply(fast.qkv(a), cos, sin, n_q, n_kv)  # (B, heads, T, hd) each
    # SDPA runs on the backends of ATTENTION_BACKENDS: the callers (model_forward, Recomputed) enter them
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
                                       scale=att.scaling, enable_gqa=n_kv != n_q)  # (B, n_q, T, hd)
    h = fast.o(o.transpose(1, 2).reshape(B, T, n_q * hd), residual=x)  # x + attention, (B, T, H)

    a = _rms_norm(h, layer.post_attention_layernorm)
    m = SwiGLU.apply(fast.gate_up(a))  # (B, T, I)
    return fast.down(m, residual=h)  # h + MLP


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
        g = torch.cat([d.transpose(1, 2) for d in (dq, dk, dv)], dim=2)  # (B, T, heads, hd)
        n_rot, half = n_q + n_kv, g.shape[-1] // 2
        dx = torch.empty_like(g)
        gr, d = g[:, :, :n_rot], dx[:, :, :n_rot]
        torch.mul(gr, cos, out=d)
        d[..., :half].addcmul_(gr[..., half:], sin[..., half:])  # dx1 = g1 c + g2 s
        d[..., half:].addcmul_(gr[..., :half], sin[..., :half], value=-1)  # dx2 = g2 c - g1 s
        dx[:, :, n_rot:] = g[:, :, n_rot:]
        return dx.flatten(2), None, None, None, None


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the stacked (..., 2I) output of the gate/up projection; keeps only that input."""

    @staticmethod
    def forward(ctx, gu):
        gate, up = gu.chunk(2, dim=-1)
        ctx.save_for_backward(gu)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dm):
        (gu,) = ctx.saved_tensors
        gate, up = gu.chunk(2, dim=-1)
        dgu = torch.empty_like(gu)
        d_gate, d_up = dgu.chunk(2, dim=-1)
        torch.mul(dm, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(dm * up, gate, grad_input=d_gate)  # (dm up) silu'(gate)
        return dgu
