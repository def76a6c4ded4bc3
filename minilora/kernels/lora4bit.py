"""LoRA over a frozen 4-bit (or plain) linear as one autograd function:

    y = x W^T + b + s * (dropout(x) A^T) B^T,    W: (out, in),  A: (r, in),  B: (out, r),  s = alpha / r

Against the plain path (bitsandbytes' MatMul4Bit for the base, then two nn.Linear, a multiply and an add):
- the scaled LoRA term is added by the epilogue of a GEMM (`addmm_(alpha=s)`), so neither the (N, out) LoRA
  output nor its scaled copy exists; in the backward the base and LoRA input gradients share one GEMM output.
- one node saves what the LoRA grads need: the (dropped-out) input, A, B and the small (N, r) x A^T.
- the dequantized W is never saved. The forward hands the 4-bit weight to bitsandbytes' `matmul_4bit`, which
  (in 0.50.2) runs its `gemm_4bit` op: W is dequantized into a temporary in the compute dtype and multiplied
  (on CUDA, for few rows, the 4-bit weight may be read directly instead). The backward dequantizes W once
  (`dequantize_4bit`), uses it and frees it, and skips that when x needs no gradient. Two different ops on
  purpose: under torch.compile AOTAutograd merges identical ops of the forward and the backward, and with
  `dequantize_4bit` in both, every projection's W was saved for the backward (measured on the CPU; a
  bitsandbytes whose matmul_4bit calls dequantize_4bit would do the same, and tests/test_kernels.py says so).
Per weight and step that is 1 dequantization in the forward and 1 in the backward, as for the plain path, and
3 under checkpointing (forward, recompute, backward): the recompute needs W for the outputs that the rest of
the layer consumes, so a third dequantization could only be saved by keeping W alive until the backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import bitsandbytes as bnb
except ImportError:  # plain nn.Linear bases work without bitsandbytes
    bnb = None


def is_4bit(module: nn.Module) -> bool:
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _standard_layout(w):
    """The 4-bit weight in bnb's standard layout. On CPUs with AVX512-BF16, bnb repacks it for its
    inference-only kernel at the first eval forward (load_model turns that off); dequantize_4bit reads only
    the standard layout, so restore it, once, in place."""
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return w


def dequantize(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in `dtype`: a fresh dequantized copy for a 4-bit base, the (cast) parameter otherwise."""
    if not is_4bit(base):
        return base.weight.to(dtype)
    w = _standard_layout(base.weight)
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)  # a no-op cast in the usual case


def _base_forward(x: torch.Tensor, base: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b, (N, in) -> (N, out), in x's dtype; a 4-bit W is dequantized into a temporary only."""
    if not is_4bit(base):
        return F.linear(x, base.weight.to(x.dtype), bias)
    w = _standard_layout(base.weight)
    return bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state, bias=bias)  # x @ W^T; grad is off in here


class LoRALinearFunction(torch.autograd.Function):
    """Forward and backward of the formula above on 2-D inputs, every tensor in one compute dtype.

    xd is the dropped-out input of the LoRA branch, or None when there is no dropout: then x feeds both
    branches and their input gradients are summed inside one GEMM.
    """

    @staticmethod
    def forward(ctx, x, xd, A, B, bias, base: nn.Module, scaling: float):
        y = _base_forward(x, base, bias)  # (N, out)
        xl = x if xd is None else xd  # (N, in): the LoRA branch's input
        xa = torch.mm(xl, A.t())  # (N, r)
        y.addmm_(xa, B.t(), alpha=scaling)  # y += s * (x A^T) B^T
        ctx.save_for_backward(xl, A, B, xa)
        ctx.base, ctx.scaling, ctx.shared_input = base, scaling, xd is None
        return y

    @staticmethod
    def backward(ctx, dy):  # dy: (N, out)
        xl, A, B, xa = ctx.saved_tensors
        need_x, need_xd, need_A, need_B, need_bias = ctx.needs_input_grad[:5]
        dyB = torch.mm(dy, B).mul_(ctx.scaling)  # (N, r): s * dy B, scaled on the small side once
        grad_A = torch.mm(dyB.t(), xl) if need_A else None  # (r, in)
        grad_B = torch.mm(dy.t(), xa).mul_(ctx.scaling) if need_B else None  # (out, r)
        grad_bias = dy.sum(0) if need_bias else None
        grad_x = grad_xd = None
        if need_x:
            W = dequantize(ctx.base, dy.dtype)  # (out, in)
            grad_x = torch.mm(dy, W)  # (N, in)
            del W  # freed at once, before anything else is allocated
            if ctx.shared_input:
                grad_x.addmm_(dyB, A)  # + s * dy B A, the LoRA branch's share
        if need_xd:
            grad_xd = torch.mm(dyB, A)  # (N, in); autograd takes it back through the dropout mask to x
        return grad_x, grad_xd, grad_A, grad_B, grad_bias, None, None


def fused_lora_linear(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float,
                      dropout: nn.Module) -> torch.Tensor:
    """`base(x) + scaling * dropout(x) A^T B^T` through `LoRALinearFunction`, for x of shape (..., in).

    The compute dtype is autocast's when autocast is on (bf16 on the GPU), else x's (as Linear4bit picks it).
    Everything is cast to it here, outside the function, so that autograd casts the gradients back (to fp32
    LoRA weights, say) and the function sees one dtype whether autocast is on or not. Returns x's dtype.
    """
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    h = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
    hd = None
    if not isinstance(dropout, nn.Identity):
        # Dropout stays outside the function, as its own autograd op on x like in the plain path: one mask,
        # drawn once, that autograd applies to the LoRA branch's input gradient too.
        hd = dropout(x).reshape(h.shape).to(dtype)
    bias = None if base.bias is None else base.bias.to(dtype)
    y = LoRALinearFunction.apply(h, hd, A.to(dtype), B.to(dtype), bias, base, scaling)  # (N, out)
    return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
