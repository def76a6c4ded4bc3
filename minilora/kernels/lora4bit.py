"""Frozen linears that read the same input, plus their LoRA updates, as one autograd function:

    y = [residual +] x W^T [+ b],   then for each LoRA member j on the rows R_j of W:
    y[:, R_j] += s_j * (xl_j A_j^T) B_j^T,    W: (out, in),  A_j: (r, in),  B_j: (|R_j|, r),  s_j = alpha_j / r_j

W is the members' frozen weights stacked along the output (an attention's q, k and v give one (q + 2 kv, hidden)
matrix), so the base is one GEMM however many members there are. xl_j is x, or its dropped-out copy when the
member has LoRA dropout. A single linear is a projection of one member (o_proj, down_proj).

Against the plain path (bitsandbytes' MatMul4Bit per linear, then two nn.Linear, a multiply and an add):
- the scaled LoRA terms are added by GEMM epilogues (`addmm_(alpha=s)`) into the output's rows, and a residual
  by the base GEMM's own (`addmm(residual, x, W^T)`): no (N, out) LoRA output, scaled copy or sum exists;
- one node saves what the LoRA grads need: the members' inputs, A, B and the small (N, r) products xl A^T;
- the dequantized W is not saved by default: it is dequantized again in the backward, used and freed, and not
  at all when x needs no gradient (the first layer's input). `Projection.keep_weights` saves it instead: a checkpointed
  layer sets it, so the recompute's W serves the backward (2 dequantizations a step instead of 3; the
  checkpoint's first forward runs without grad and saves nothing, so it costs memory only from recompute to
  backward).
- `Projection.cache` keeps W dequantized for good: no dequantization at all, for 2 bytes a weight.
- `Projection.split` dequantizes one member's weight at a time, each used and freed before the next, and
  writes each member's GEMM into its rows of the output: a projection then holds at most its largest
  member's weight (gate's, not gate's and up's), for a GEMM launch per member.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import nf4
from .dora import computes, dora_rows, magnitude

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


def dequantize(base: nn.Module, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """W (out, in) in `dtype`: a fresh dequantized copy for a 4-bit base, the (cast) parameter otherwise.
    With `out`, W is written there and `out` is returned. On CUDA, NF4 weights go through minilora's one-kernel
    dequantization (kernels/nf4.py), bit for bit bitsandbytes' result; the rest through bitsandbytes."""
    if not is_4bit(base):
        return base.weight.to(dtype) if out is None else out.copy_(base.weight)
    w = _standard_layout(base.weight)
    if w.device.type == "cuda" and dtype == w.quant_state.dtype:
        out = torch.empty(w.quant_state.shape, dtype=dtype, device=w.device) if out is None else out
        if _by_kernel(w, dtype) and out.is_contiguous():
            return nf4.dequantize_nf4(w, out)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state, out=out)
    W = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return W.to(dtype) if out is None else out.copy_(W)  # the cast is a no-op in the usual case


def _by_kernel(w, dtype: torch.dtype) -> bool:
    """Whether dequantize() takes minilora's Triton kernel for this 4-bit weight in `dtype`, not bitsandbytes."""
    return dtype == w.quant_state.dtype and nf4.supported(w, dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype when autocast is on for x's device (bf16 on the GPU), else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class Projection:
    """Linears that read one input (`members`: LoRALinear or plain/4-bit linears), computed as one.

    Not an nn.Module: it holds references to the model's own modules, which keep every parameter, so state
    dicts, adapters and merging see nothing new. prepare_for_training sets `cache`; `set_mode` the rest, per
    micro-batch.
    """

    def __init__(self, members: list[nn.Module], cache: bool = False):
        self.bases = [m.base if hasattr(m, "lora_A") else m for m in members]
        if any(getattr(b, "lora_A", None) is not None for b in self.bases):
            raise ValueError("nested LoRA layers cannot be projected")
        self.in_features = self.bases[0].in_features
        if any(b.in_features != self.in_features for b in self.bases):
            raise ValueError("a projection's members must share the input size, got "
                             f"{[b.in_features for b in self.bases]}")
        rows, start = [], 0
        for b in self.bases:
            rows.append(slice(start, start + b.out_features))
            start += b.out_features
        self.out_features = start
        self.loras = [(r, m) for r, m in zip(rows, members) if hasattr(m, "lora_A") and not m.merged]
        if not all(map(computes, (m for _, m in self.loras))):
            raise ValueError("an adapter has tensors that the fused projection does not compute")
        self.dora = any(magnitude(m) is not None for _, m in self.loras)
        self.rows = rows
        self.has_bias = any(b.bias is not None for b in self.bases)
        # Only a 4-bit weight is worth keeping dequantized: a plain one is there already (stacking several
        # plain weights makes a copy per call instead, which is the rare quant=None case).
        self.quantized = all(is_4bit(b) for b in self.bases)
        self.cache, self.cached = cache and self.quantized, None
        self.set_mode(keep_weights=False, split=False)

    def set_mode(self, keep_weights: bool, split: bool):
        """keep_weights: the forward saves the dequantized weight for the backward. split: members dequantized one
        at a time, where the weight is neither kept nor cached."""
        self.keep_weights = keep_weights and self.quantized
        self.split = split and len(self.bases) > 1 and not (self.cache or self.keep_weights)

    def capturable(self, dtype: torch.dtype) -> bool:
        """Whether `weight(dtype)` makes no bitsandbytes call, which a CUDA graph cannot capture: the weight is
        kept dequantized, plain, or NF4 for minilora's Triton kernel (kernels/nf4.py)."""
        return self.cache or all(not is_4bit(b) or _by_kernel(b.weight, dtype) for b in self.bases)

    def bias(self, dtype) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        return torch.cat([b.bias.to(dtype) if b.bias is not None else b.weight.new_zeros(b.out_features, dtype=dtype)
                          for b in self.bases])

    def matmul(self, x: torch.Tensor, residual: torch.Tensor | None = None, W: torch.Tensor | None = None):
        """[residual +] x W^T for x (N, in) in the compute dtype, with no bias: (N, out). W: the weight, if
        the caller has it already."""
        if not self.split:
            W = W if W is not None else self.weight(x.dtype)
            return torch.mm(x, W.t()) if residual is None else torch.addmm(residual, x, W.t())
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device) if residual is None \
            else residual.clone()
        for base, rows in zip(self.bases, self.rows):
            y[:, rows].addmm_(x, dequantize(base, x.dtype).t(), beta=0 if residual is None else 1)
        return y

    def matmul_t(self, dy: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
        """dy W for dy (N, out): the input gradient of the base GEMM; W: a kept copy of the weight."""
        if not self.split:
            return torch.mm(dy, W if W is not None else self.weight(dy.dtype))
        dx = None
        for base, rows in zip(self.bases, self.rows):
            Wj = dequantize(base, dy.dtype)
            dx = torch.mm(dy[:, rows], Wj) if dx is None else dx.addmm_(dy[:, rows], Wj)
            del Wj  # freed before the next member's is made
        return dx

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W (out, in) in dtype: the cached copy, or a fresh dequantization (kept when `cache` is set)."""
        if self.cached is not None and self.cached.dtype == dtype:
            return self.cached
        if len(self.bases) == 1:
            W = dequantize(self.bases[0], dtype)
        else:
            W = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.bases[0].weight.device)
            for base, rows in zip(self.bases, self.rows):
                dequantize(base, dtype, out=W[rows])
        if self.cache:
            self.cached = W
        return W

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, grad_only: bool = False) -> torch.Tensor:
        """`[residual +] x W^T + LoRA` for x of shape (..., in) in the compute dtype; returns (..., out).

        The activations are cast to the compute dtype here; the LoRA weights (fp32 master weights, say) inside
        the function, which computes in that dtype and hands their gradients back in their own. grad_only: only
        the backward will run, whose gradients need none of the output's values (the last projection of a
        checkpointed unit's recompute): the output is a placeholder of its shape, and the forward runs no GEMM (nor
        a dequantization, unless keep_weights keeps the weight); x's values serve the LoRA members' gradients alone.
        """
        dtype = compute_dtype(x)
        lora = []
        for _, m in self.loras:
            # Dropout stays outside the function, as its own autograd op on x like in the plain path: each
            # member draws its own mask, in the plain path's order, and autograd routes its gradient.
            xl = None if isinstance(m.dropout, nn.Identity) else _as(m.dropout(x), dtype)
            lora += [xl, m.lora_A.weight, m.lora_B.weight]
        res = None if residual is None else _as(residual, dtype)
        if not self.dora:
            return ProjectFn.apply(_as(x, dtype), res, self, grad_only, *lora)
        # DoRA members rescale their rows of the output, whose values their magnitudes' gradients read: no
        # placeholder, and the residual added after
        dora = {rows.start: (m, xl) for (rows, m), xl in zip(self.loras, lora[0::3]) if magnitude(m) is not None}
        y = dora_rows(self, ProjectFn.apply(_as(x, dtype), None, self, False, *lora), dora, dtype)
        return y if res is None else y + res

    def member_weight(self, j: int, dtype: torch.dtype) -> torch.Tensor:
        """Member j's weight (out_j, in) in dtype: the rows of the cached weight, or a fresh dequantization."""
        if self.cached is not None and self.cached.dtype == dtype:
            return self.cached[self.rows[j]]
        return dequantize(self.bases[j], dtype)


def placeholder(like: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of `shape` with like's dtype and device that holds no memory (one element, broadcast): the output
    of a function whose values nobody reads, only its backward."""
    return like.new_empty(()).expand(shape)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips the call, not just the copy: this runs per layer


class ProjectFn(torch.autograd.Function):
    """Forward and backward of a Projection in x's (compute) dtype; x (..., in) -> (..., out).

    lora holds (xl, A, B) per LoRA member; xl is None when the member has no dropout: x then feeds both
    branches and their input gradients are summed inside one GEMM. Inputs are flattened to 2-D inside, where
    autograd records no view of them.

    Forward: y = [residual +] x W^T [+ b], y[:, R_j] += s_j (xl_j A_j^T) B_j^T (with grad_only, a placeholder for
    y and the xl_j A_j^T alone, which is all the backward reads). Backward, dy_j = dy[:, R_j]:
    dx = dy W (+ s_j dy_j B_j A_j for a member without dropout), dxl_j = s_j dy_j B_j A_j (one with dropout),
    dA_j = s_j (dy_j B_j)^T xl_j, dB_j = s_j dy_j^T (xl_j A_j^T), d residual = dy; W and b get none.
    """

    @staticmethod
    def forward(ctx, x, residual, proj: Projection, grad_only: bool, *lora):
        shape = (*x.shape[:-1], proj.out_features)
        x2 = x.reshape(-1, proj.in_features)  # (N, in)
        # the weight (out, in) is kept for the backward when `keep_weights` says so (and it is not cached anyway)
        W = proj.weight(x.dtype) if proj.keep_weights and proj.cached is None else None
        y = None
        if not grad_only:
            y = proj.matmul(x2, None if residual is None else residual.reshape(-1, shape[-1]), W)
            bias = proj.bias(x.dtype)
            if bias is not None:
                y += bias
        saved = []
        for (rows, m), (xl, A, B) in zip(proj.loras, zip(lora[0::3], lora[1::3], lora[2::3])):
            xl = x2 if xl is None else xl.reshape(x2.shape)
            A, B = _as(A, x.dtype), _as(B, x.dtype)
            xa = torch.mm(xl, A.t())  # (N, r)
            if y is not None:
                y[:, rows].addmm_(xa, B.t(), alpha=m.scaling)  # y_j += s (xl A^T) B^T, into the member's rows
            saved += [xl, A, B, xa]
        ctx.save_for_backward(W, *saved)
        ctx.proj, ctx.shared, ctx.x_shape = proj, [xl is None for xl in lora[0::3]], x.shape
        ctx.weight_dtypes = [A.dtype for A in lora[1::3]]
        return placeholder(x, shape) if y is None else y.view(shape)

    @staticmethod
    def backward(ctx, dy):  # dy: (..., out)
        W, *saved = ctx.saved_tensors
        proj, need_x, need_res = ctx.proj, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy2 = dy.reshape(-1, proj.out_features)  # (N, out)
        dx = None
        if need_x:
            dx = proj.matmul_t(dy2, W)  # (N, in); a fresh dequantization is freed at once
        del W
        grads = []
        for j, (rows, m) in enumerate(proj.loras):
            xl, A, B, xa = saved[4 * j: 4 * j + 4]
            needs = ctx.needs_input_grad[4 + 3 * j: 7 + 3 * j]
            dyj = dy2[:, rows]  # (N, out_j)
            dyB = torch.mm(dyj, B).mul_(m.scaling)  # (N, r): s * dy B, scaled on the small side once
            wdt = ctx.weight_dtypes[j]
            grad_A = _as(torch.mm(dyB.t(), xl), wdt) if needs[1] else None  # (r, in)
            grad_B = _as(torch.mm(dyj.t(), xa).mul_(m.scaling), wdt) if needs[2] else None  # (out_j, r)
            grad_xl = None
            if ctx.shared[j]:
                if dx is not None:
                    dx.addmm_(dyB, A)  # + s dy B A, the LoRA branch's share of the input gradient
            elif needs[0]:
                grad_xl = torch.mm(dyB, A).view(ctx.x_shape)  # autograd takes it back through the dropout mask
            grads += [grad_xl, grad_A, grad_B]
        return None if dx is None else dx.view(ctx.x_shape), dy if need_res else None, None, None, *grads
