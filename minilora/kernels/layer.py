"""minilora's training forward of a LLaMA model: the same weights and formula as transformers' in fewer kernels.

transformers' LlamaForCausalLM stays the model definition: checkpoints, generation and the PEFT comparison use
it as it is. prepare_for_training(fast=True) gives every decoder layer a FastLayer, and minilora's loss then
runs the decoder through `model_forward` instead. Per layer it launches about a third of the plain path's
kernels and keeps fewer activations:
- q, k, v are one GEMM over their stacked weights (one dequantization pass), and so are gate and up; LoRA
  terms and the residual adds land in GEMM epilogues (lora4bit.Projection);
- RoPE rotates q and k in one pass and copies v beside them, so attention keeps one (B, T, heads, hd) tensor
  and the projection's output is freed (rope.py);
- attention is SDPA with is_causal and no mask for right-padded rows (a causal model never looks right, so
  padding needs no mask), on flash attention (no per-shape plan), or cuDNN's from LONG_ATTENTION tokens a row;
  a packed row's examples each attend to themselves through variable-length flash attention (attention.py);
- SwiGLU keeps only gate and up (one tensor) for its backward, where autograd would also keep silu(gate)
  (swiglu.py);
- RMSNorm keeps x and its fp32 1/rms only, and runs torch's fused kernels on CUDA (rmsnorm.py).
The memory plan decides per layer whether its weights stay dequantized for good (`cache`), whether it is
checkpointed, and whether its recompute keeps the weights for the backward (`keep_weights`); see lora4bit.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import attention  # KEEP_ATTENTION and keep_attention are read through it at call time: patchable there
from .attention import KeptAttention, Segments, attention_backends, segment_attention
from .dora import computes
from .lora4bit import Projection, compute_dtype
from .offload import Offload, embed
from .rmsnorm import rms_norm
from .rope import Rope
from .stream import streamed
from .swiglu import SwiGLU


class FastLayer:
    """How one LlamaDecoderLayer trains: its projections, built from its own (LoRA, 4-bit) modules, and
    whether it is checkpointed (its input kept, the rest recomputed in the backward).

    offload: the lean mode. The layer is checkpointed as two units, attention and MLP, whose inputs wait in
    pinned host memory (kernels/offload.py), and projections dequantize their members' weights one at a time:
    the backward then holds one half's activations and one member's weight at a time. From KEEP_ATTENTION
    tokens a row the attention unit also offloads attention's output, which its recompute then reuses.
    """

    def __init__(self, layer: torch.nn.Module, cache=False, keep_weights=False, checkpoint=False, offload=False):
        att, mlp = layer.self_attn, layer.mlp
        self.qkv = Projection([att.q_proj, att.k_proj, att.v_proj], cache)
        self.o = Projection([att.o_proj], cache)
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj], cache)
        self.down = Projection([mlp.down_proj], cache)
        self.lean = offload
        self.set_mode(checkpoint, keep_weights)
        # the adapters' tensors of each unit (LoRA's A and B, DoRA's magnitudes), which a checkpointed unit's single
        # autograd node must name as inputs
        self.params = {part: [w for p in projections for _, m in p.loras for w in m.adapter_tensors()]
                       for part, projections in ((attention_block, (self.qkv, self.o)),
                                                 (mlp_block, (self.gate_up, self.down)))}
        self.params[layer_forward] = self.params[attention_block] + self.params[mlp_block]

    def set_mode(self, checkpoint: bool, keep_weights: bool):
        """Whether the layer is checkpointed, and then whether its recompute keeps its weights for the backward:
        a micro-batch's own choice (set_checkpointing), made before its forward. In the lean mode a checkpointed
        layer offloads, and projections that keep no weights dequantize them member by member."""
        self.checkpoint, self.offload = checkpoint, self.lean and checkpoint
        for p in self.projections():
            p.set_mode(keep_weights and checkpoint, split=self.lean)

    def projections(self) -> tuple[Projection, ...]:
        return self.qkv, self.o, self.gate_up, self.down


# model types whose decoder layer computes LLaMA's: pre-norm RMSNorm, rotary attention, a SwiGLU MLP (tests prove
# the fast layers equal to transformers' on each: tests/test_families.py)
FAST_FAMILIES = ("llama", "mistral", "qwen2")


def unsupported(model, max_len: int | None = None) -> str | None:
    """Why the fast layers cannot run this model (a CausalLM, perhaps on the meta device) on rows of up to max_len
    tokens, or None when they can: the one place that decides, from the model's structure. The rotary embedding is
    the model's own module (any rope_type: default, llama3, ...); biases are the projections' own."""
    c = model.config
    layer = getattr(getattr(model, "model", None), "layers", [None])[0]
    att, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(att, n)]
    missing += [n for n in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, n)]
    if missing:
        return f"its decoder layer has no {', '.join(missing)}"
    if hasattr(att, "q_norm") or hasattr(att, "k_norm"):
        return "its attention normalizes q and k"
    adapted = [n for n, m in model.named_modules() if hasattr(m, "adapter_tensors") and not computes(m)]
    if adapted:
        return f"the adapter on {adapted[0]} has tensors that the fast layers do not compute"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"hidden_act {c.hidden_act!r} is not 'silu'"
    if getattr(c, "attention_dropout", 0.0):
        return f"attention_dropout {c.attention_dropout} is not 0"
    # a window that attention applies: the layers' own (Qwen2: per layer), else the config's (Mistral)
    windows = [getattr(m.self_attn, "sliding_window", c.sliding_window if hasattr(c, "sliding_window") else None)
               for m in model.model.layers]
    window = min((w for w in windows if w), default=None)
    if window and max_len and max_len > window:
        return (f"its sliding window of {window} tokens is shorter than max_len {max_len} (the fast layers' attention "
                "is plain causal, which equals the window's only up to its length)")
    if c.model_type not in FAST_FAMILIES:
        return f"model_type {c.model_type!r} is none of those the fast layers are tested on: {', '.join(FAST_FAMILIES)}"
    return None


def attach_fast(layer: torch.nn.Module, spec: FastLayer):
    """Make `layer` (a LlamaDecoderLayer) train through `spec` in model_forward. Kept outside the module's
    submodules and parameters: state dicts, adapters and generation see the layer as it was."""
    layer.__dict__[_FAST] = spec


def detach_fast(model: torch.nn.Module):
    """Drop every decoder layer's FastLayer, and with it the weights it keeps dequantized."""
    for layer in model.model.layers:
        layer.__dict__.pop(_FAST, None)


def set_checkpointing(model: torch.nn.Module, checkpointed: int, keep_weights: bool):
    """Checkpoint the first `checkpointed` fast layers (their recompute keeping its weights if keep_weights) and
    not the others, for the forwards to come."""
    for i, layer in enumerate(model.model.layers):
        fast_layer(layer).set_mode(i < checkpointed, keep_weights)


def fast_layer(layer: torch.nn.Module) -> FastLayer:
    return layer.__dict__[_FAST]


def is_fast(model) -> bool:
    return _FAST in model.model.layers[0].__dict__


_FAST = "_minilora_fast"  # where a decoder layer holds its FastLayer: read and written only by the functions above


def capturable(model, dtype: torch.dtype) -> bool:
    """Whether every fast layer's projections can run inside a CUDA graph in `dtype` (Projection.capturable)."""
    return is_fast(model) and all(p.capturable(dtype) for layer in model.model.layers
                                  for p in fast_layer(layer).projections())


def rope_tables(model, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (1 or B, T, 1, head_dim) in h's dtype, at `positions` (1 or B, T): from the model's own
    rotary embedding (any rope_type), shared by every layer."""
    return tuple(t.to(h.dtype)[:, :, None] for t in model.model.rotary_emb(h, positions))


def model_forward(model, input_ids, segments: Segments | None = None, position_ids=None,
                  inputs_embeds=None) -> torch.Tensor:
    """The final-norm hidden states (B, T, H) of a LlamaForCausalLM prepared with fast=True.

    segments: None for right-padded rows (causal attention is exact for them), or where the examples of a
    packed row (B = 1) begin and end, with position_ids restarting at 0 in each. inputs_embeds: the embedded
    input_ids (embed's, when None).
    """
    inner = model.model
    if inputs_embeds is None:
        inputs_embeds = embed(model, input_ids)  # (B, T, H)
    h = inputs_embeds.to(compute_dtype(inputs_embeds))
    if position_ids is None:
        position_ids = torch.arange(h.shape[1], device=h.device)[None]
    cos, sin = rope_tables(model, h, position_ids)
    copies = Offload(h.device) if torch.is_grad_enabled() and any(
        fast_layer(layer).offload for layer in inner.layers) else None
    with attention_backends(h.shape[1]):
        h = _layers(inner.layers, h, cos, sin, segments, copies)
    return rms_norm(h, inner.norm)


def _layers(layers, h, cos, sin, segments, copies):
    for layer in layers:
        spec = fast_layer(layer)
        if stream := streamed(layer):  # its 4-bit weights come from host memory (stream.py)
            stream[0].use(stream[1], +1)
        if not (spec.checkpoint and torch.is_grad_enabled()):
            h = layer_forward(layer, h, cos, sin, segments)
            continue
        for part in (attention_block, mlp_block) if spec.offload else (layer_forward,):
            h = Recomputed.apply(h, layer, cos, sin, segments, part, copies if spec.offload else None,
                                 *spec.params[part])
    return h


class Recomputed(torch.autograd.Function):
    """A checkpointed unit of a fast layer (`part`: the whole layer, or its attention or MLP half): the forward
    keeps only the unit's input (and the RNG state), on the GPU or, with `copies` (an Offload), in host memory; the
    backward runs the unit again, with the same dropout masks, and backpropagates through that. An offloaded
    attention unit on rows of KEEP_ATTENTION tokens or more also keeps attention's output (`KeptAttention`).

    One autograd node per unit, with its LoRA weights as inputs so that it is part of the graph even when x
    needs no gradient (the first layer's input). torch.utils.checkpoint's non-reentrant form instead routes
    every tensor the unit saves through saved-tensor hooks, which costs more host time than the unit's own
    forward. A projection that keeps its weights (`Projection.keep_weights`) saves them only in the recompute, which
    lives until this node's backward ends.

    Forward: y = part(x), run without grad. Backward: part(x) again with grad (same RNG state and autocast),
    then dx and the LoRA weights' gradients as the vector-Jacobian product of that recompute with dy. The backward
    needs y's graph, not its values (no function saves its own output), so the recompute is `grad_only`: the
    unit's last projection (o or down) runs no GEMM, and down's input (SwiGLU's output) is not computed unless
    down's LoRA needs it: up to a third of the recompute's FLOPs.
    """

    @staticmethod
    def forward(ctx, x, layer, cos, sin, segments, part, copies, *params):
        ctx.layer, ctx.segments, ctx.part, ctx.copies = layer, segments, part, copies
        ctx.rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        if copies:
            ctx.slot = copies.save(x)
        else:
            ctx.save_for_backward(x)
        ctx.cos_sin = cos, sin  # shared by every layer: not saved (nor offloaded) per layer
        kept_attention = [] if copies and part is attention_block and x.shape[1] >= attention.KEEP_ATTENTION \
            else None
        with torch.no_grad():
            y = part(layer, x, cos, sin, segments, kept_attention)
        ctx.state = None
        if kept_attention:  # attention's output and logsumexp go with x; the backend's small state stays here
            o, lse, ctx.state = kept_attention[0]
            copies.add(ctx.slot, o, lse)
        return y

    @staticmethod
    def backward(ctx, dy):
        if stream := streamed(ctx.layer):
            stream[0].use(stream[1], -1)
        x, *kept = ctx.copies.load(ctx.slot) if ctx.copies else ctx.saved_tensors
        cos, sin = ctx.cos_sin
        params = fast_layer(ctx.layer).params[ctx.part]
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), attention_backends(x.shape[1]), \
                torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            (torch.cuda.set_rng_state(ctx.rng, x.device) if x.is_cuda else torch.set_rng_state(ctx.rng))
            x_ = x.detach().requires_grad_(ctx.needs_input_grad[0])
            y = ctx.part(ctx.layer, x_, cos, sin, ctx.segments, [(*kept, ctx.state)] if kept else None,
                         grad_only=True)
            inputs = ([x_] if x_.requires_grad else []) + params
            grads = torch.autograd.grad(y, inputs, dy, allow_unused=True)
        dx = grads[0] if x_.requires_grad else None
        return dx, None, None, None, None, None, None, *grads[len(inputs) - len(params):]


def layer_forward(layer, x, cos, sin, segments=None, kept_attention=None, grad_only=False):
    """One LlamaDecoderLayer through its FastLayer: x (B, T, H) -> (B, T, H), in x's (compute) dtype.
    (kept_attention, for one signature with the halves: a whole checkpointed layer keeps no attention output.)"""
    return mlp_block(layer, attention_block(layer, x, cos, sin, segments), grad_only=grad_only)


def attention_block(layer, x, cos, sin, segments=None, kept_attention=None, grad_only=False):
    """x + attention(norm(x)): the layer's first half.

    kept_attention: an empty list asks to keep attention's output: where the backend allows (rows not packed, as
    many kv heads as q heads), (o, logsumexp, state) is appended to it. A list holding that runs the recompute of
    the same unit, whose attention then returns the kept output (KeptAttention). grad_only: only the backward
    will run, so the output is a placeholder (Projection's grad_only).
    """
    spec = fast_layer(layer)
    att = layer.self_attn
    B, T, _ = x.shape
    hd, n_q, n_kv = att.head_dim, att.config.num_attention_heads, att.config.num_key_value_heads
    a = rms_norm(x, layer.input_layernorm)
    q, k, v = Rope.apply(spec.qkv(a), cos, sin, n_q, n_kv)  # (B, heads, T, hd) each
    if kept_attention:
        o = KeptAttention.apply(q, k, v, att.scaling, kept_attention[0])
    elif segments is not None:
        o = segment_attention(q, k, v, segments, att.scaling)
    elif (kept_attention is not None and n_kv == n_q
          and (kept := attention.keep_attention(q, k, v, att.scaling))):
        kept_attention.append(kept)
        o = kept[0]
    else:  # SDPA on the backends of attention_backends: the callers (model_forward, Recomputed) enter them
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=att.scaling,
                                           enable_gqa=n_kv != n_q)  # (B, n_q, T, hd)
    return spec.o(o.transpose(1, 2).reshape(B, T, n_q * hd), residual=x, grad_only=grad_only)  # x + attention


def mlp_block(layer, h, cos=None, sin=None, segments=None, kept_attention=None, grad_only=False):
    """h + MLP(norm(h)): the layer's second half (the unused arguments keep one signature with the first).
    grad_only: only the backward will run: the output is a placeholder, and so is down's input unless down's LoRA
    needs its values."""
    spec = fast_layer(layer)
    gu = spec.gate_up(rms_norm(h, layer.post_attention_layernorm))  # (B, T, 2I)
    m = SwiGLU.apply(gu, not grad_only or bool(spec.down.loras))  # (B, T, I)
    return spec.down(m, residual=h, grad_only=grad_only)
