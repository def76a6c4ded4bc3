"""The rotary position embedding of the fast layer, applied to q and k as they leave the qkv projection: one
Triton pass over the heads on CUDA, torch's elementwise ops elsewhere."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ROWS = 16  # (token, head) rows of head_dim values per Triton program


class Rope(torch.autograd.Function):
    """q, k, v (B, heads, T, hd) from the qkv projection's (B, T, (n_q + 2 n_kv) hd) output, with the rotary
    embedding on q and k: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) over the two halves of hd.
    v is copied beside them, so the three are views of one new tensor and the projection's output is freed.
    Saves nothing but cos and sin (1 or B, T, 1, hd), which every layer shares.

    Forward, per half of hd with c, s the matching halves of cos, sin: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
    on q and k; y = x on v. Backward, the transpose of that rotation: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
    on q and k; dv passes through; all three into one (B, T, (n_q + 2 n_kv) hd) gradient.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int):
        B, T, _ = qkv.shape
        x = qkv.view(B, T, n_q + 2 * n_kv, -1)  # (B, T, heads, hd)
        out = torch.empty_like(x)
        _rotate(x, out, cos, sin, n_q + n_kv, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_q, n_kv)
        return tuple(t.transpose(1, 2) for t in out.split([n_q, n_kv, n_kv], dim=2))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        n_q, n_kv = ctx.heads
        B, _, T, hd = dq.shape
        dx = torch.empty(B, T, n_q + 2 * n_kv, hd, dtype=dq.dtype, device=dq.device)  # (B, T, heads, hd)
        for g, d, n_rot in zip((dq, dk, dv), dx.split([n_q, n_kv, n_kv], dim=2), (n_q, n_kv, 0)):
            _rotate(g.transpose(1, 2), d, cos, sin, n_rot, backward=True)  # each grad rotated into its slot
        return dx.flatten(2), None, None, None, None


def _rotate(x, out, cos, sin, n_rot: int, backward: bool):
    """out = x rotated (the forward's rotation, or with backward its transpose) on the first n_rot heads and
    copied on the rest; x, out (B, T, heads, hd), cos, sin (1 or B, T, 1, hd)."""
    B, T, heads, hd = x.shape
    tensors = (x, out, cos, sin)
    if not (triton is not None and all(t.is_cuda and t.stride(-1) == 1 for t in tensors) and hd & (hd - 1) == 0
            and cos.stride() == sin.stride()):
        return _rotate_torch(x, out, cos, sin, n_rot, backward)
    rows = B * T * heads
    c_b = cos.stride(0) if cos.shape[0] > 1 else 0  # cos and sin of one row, or of each
    _rope[(triton.cdiv(rows, ROWS),)]((x, out, cos, sin), rows, T,
                                      (heads, n_rot, *x.stride()[:3], *out.stride()[:3], c_b, cos.stride(1)), HD=hd,
                                      BACKWARD=backward)


def _rotate_torch(x, out, cos, sin, n_rot: int, backward: bool):
    half = x.shape[-1] // 2
    xr, o = x[:, :, :n_rot], out[:, :, :n_rot]
    s1, s2 = sin[..., :half], sin[..., half:]
    torch.mul(xr, cos, out=o)
    o[..., :half].addcmul_(xr[..., half:], s2 if backward else s1, value=1 if backward else -1)  # -x2 s1 / +g2 s2
    o[..., half:].addcmul_(xr[..., :half], s1 if backward else s2, value=-1 if backward else 1)  # +x1 s2 / -g1 s1
    out[:, :, n_rot:] = x[:, :, n_rot:]


if triton is not None:

    _ROWS = tl.constexpr(ROWS)

    # rows and T not specialized: Triton compiles a variant for each integer argument that is 1 or divisible by 16
    # (tuple elements too), so a decoded token's step (T = 1) and a prompt's length would each compile kernels that
    # training's lengths never use
    @triton.jit(do_not_specialize=["rows", "T"])
    def _rope(tensors, rows, T, layout, HD: tl.constexpr, BACKWARD: tl.constexpr):
        """tensors: x, out, cos, sin; rows: B x T x heads; layout: heads, n_rot (the heads rotated), x's and out's
        strides over (b, t, head), cos's and sin's over (b, t) (0 over b for one row)."""
        x_ptr, out_ptr, cos_ptr, sin_ptr = tensors
        heads, n_rot, x_b, x_t, x_h, o_b, o_t, o_h, c_b, c_t = layout
        r = tl.program_id(0).to(tl.int64) * _ROWS + tl.arange(0, _ROWS)  # (ROWS,) rows (b, t, head)
        live = (r < rows)[:, None]
        h, t, b = r % heads, (r // heads) % T, r // (heads * T)
        i = tl.arange(0, HD)[None, :]
        partner = (i + HD // 2) % HD  # the other half's element: x2 for x1, x1 for x2
        row = (b * x_b + t * x_t + h * x_h)[:, None]
        x = tl.load(x_ptr + row + i, mask=live, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + row + partner, mask=live, other=0.0).to(tl.float32)
        at = (b * c_b + t * c_t)[:, None]
        c = tl.load(cos_ptr + at + i, mask=live, other=0.0).to(tl.float32)
        first = i < HD // 2
        if BACKWARD:  # dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
            s = tl.load(sin_ptr + at + partner, mask=live, other=0.0).to(tl.float32)
            y = x * c + tl.where(first, xp, -xp) * s
        else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
            s = tl.load(sin_ptr + at + i, mask=live, other=0.0).to(tl.float32)
            y = x * c + tl.where(first, -xp, xp) * s
        y = tl.where((h < n_rot)[:, None], y, x)
        tl.store(out_ptr + (b * o_b + t * o_t + h * o_h)[:, None] + i, y.to(out_ptr.dtype.element_ty), mask=live)
