"""The rotary position embedding of the fast layer, applied to q and k as they leave the qkv projection."""

from __future__ import annotations

import torch


class Rope(torch.autograd.Function):
    """q, k, v (B, heads, T, hd) from the qkv projection's (B, T, (n_q + 2 n_kv) hd) output, with the rotary
    embedding on q and k: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) over the two halves of hd.
    v is copied beside them, so the three are views of one new tensor and the projection's output is freed.
    Saves nothing but cos and sin, which every layer shares.

    Forward, per half of hd with c, s the matching halves of cos, sin: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
    on q and k; y = x on v. Backward, the transpose of that rotation: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
    on q and k; dv passes through; all three into one (B, T, (n_q + 2 n_kv) hd) gradient.
    """

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
