"""SwiGLU, silu(gate) * up, forward and backward each in one Triton pass with no (N, I) temporary (CUDA).

gu is the gate/up projection's stacked (N, 2I) output: gate = gu[:, :I], up = gu[:, I:]. The forward writes
m = silu(gate) * up; autograd's version also makes silu(gate). The backward writes its gradients over gu in
place, which the SwiGLU node alone holds:

    d_up   = dm * silu(gate)
    d_gate = dm * up * s * (1 + gate * (1 - s)),   s = sigmoid(gate)

in fp32, rounded once to gu's dtype. Without Triton, or off CUDA, torch's silu and silu_backward compute them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from .lora4bit import placeholder

BLOCK = 1024


def _triton_ok(*tensors) -> bool:
    return triton is not None and all(t.is_cuda and t.is_contiguous() for t in tensors)


def forward(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, of shape gu.shape[:-1] + (I,)."""
    gate, up = gu.chunk(2, dim=-1)
    if not _triton_ok(gu):
        return F.silu(gate) * up
    m = torch.empty_like(gate)
    n, cols = m.numel(), m.shape[-1]
    _forward[(triton.cdiv(n, BLOCK),)](gu, m, n, cols, BLOCK=BLOCK)
    return m


def backward_(gu: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """The gradient for gu, written over gu (whose values are then gone) and returned."""
    gate, up = gu.chunk(2, dim=-1)
    if not _triton_ok(gu, dm):  # torch's own silu and silu_backward, then written over gu
        d_gate = torch.ops.aten.silu_backward(dm * up, gate)  # (dm up) silu'(gate)
        up.copy_(dm * F.silu(gate))
        gate.copy_(d_gate)
        return gu
    n, cols = dm.numel(), dm.shape[-1]
    _backward[(triton.cdiv(n, BLOCK),)](gu, dm, n, cols, BLOCK=BLOCK)
    return gu


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the stacked (..., 2I) output of the gate/up projection; keeps only that input, and
    writes its gradient over it (`forward`, `backward_`).

    Forward: m = silu(gate) * up (values=False: a placeholder of m's shape). Backward: d_up = dm silu(gate),
    d_gate = dm up silu'(gate), with silu'(g) = s (1 + g (1 - s)), s = sigmoid(g); both into gu's storage, returned
    as gu's gradient.
    """

    @staticmethod
    def forward(ctx, gu, values: bool = True):
        ctx.save_for_backward(gu)
        if not values:  # only the backward will run, and what m feeds needs none of its values
            return placeholder(gu, (*gu.shape[:-1], gu.shape[-1] // 2))
        return forward(gu)

    @staticmethod
    def backward(ctx, dm):
        (gu,) = ctx.saved_tensors
        return backward_(gu, dm.contiguous()), None


if triton is not None:

    @triton.jit
    def _forward(gu_ptr, m_ptr, n, cols, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        at = (offs // cols) * (2 * cols) + offs % cols  # gate's element in its row of gu; up's is cols further
        g = tl.load(gu_ptr + at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + at + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(m_ptr + offs, (g * tl.sigmoid(g) * u).to(m_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward(gu_ptr, dm_ptr, n, cols, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        at = (offs // cols) * (2 * cols) + offs % cols
        g = tl.load(gu_ptr + at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + at + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(gu_ptr + at, (d * u * s * (1 + g * (1 - s))).to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptr + at + cols, (d * g * s).to(gu_ptr.dtype.element_ty), mask=mask)
