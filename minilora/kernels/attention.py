"""The fast layer's causal attention: which SDPA backends run it, the path that keeps its output, and packed rows.

attention_block (kernels/layer.py) runs SDPA with is_causal and no mask for right-padded rows, on the backends
`attention_backends` puts first for the row length. An offloaded attention unit on long rows instead keeps
attention's output and logsumexp for its recompute (`keep_attention`), which then runs no attention forward:
`KeptAttention` returns the kept output and runs the backend's own backward on it. A packed row holds several
examples (`Segments`), and `segment_attention` keeps each one's attention inside it: variable-length flash
attention on the GPU, no (T, T) mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def keep_attention(q, k, v, scale):
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
    (`keep_attention`): returns that output, and the backward runs the same backend's backward on it with the
    recomputed q, k, v, which are bitwise those of the forward.

    Forward: o = P v, P = softmax(scale q k^T + causal mask), already computed (o and lse = logsumexp of each
    row of scale q k^T). Backward, with P = exp(scale q k^T - lse) rebuilt blockwise by the backend:
    dv = P^T do;  dS = P * (do v^T - rowsum(do * o));  dq = scale dS k;  dk = scale dS^T q.
    """

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


class Segments(NamedTuple):
    """Where the examples of a packed row begin and end: example i holds positions starts[i] to starts[i + 1]
    (int32, on the row's device; a trailing run of equal entries is empty examples, which fix the length of
    `starts` for a CUDA graph). longest: an upper bound on any example's length (flash attention's grid)."""

    starts: torch.Tensor
    longest: int


def segment_mask(starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The (1, 1, T, T) boolean mask of packed causal attention, True where a query may attend: causal, and
    within the query's own example. For SDPA where flash attention cannot run, and for transformers' layers."""
    pos = torch.arange(seq_len, device=starts.device)
    example = torch.searchsorted(starts[1:], pos, right=True)  # each position's example
    return ((example[:, None] == example[None, :]) & (pos[:, None] >= pos[None, :]))[None, None]


def segment_attention(q, k, v, segments: Segments, scale: float) -> torch.Tensor:
    """Causal attention within each example of a packed row: q (1, n_q, T, hd), k and v (1, n_kv, T, hd) ->
    (1, n_q, T, hd). Variable-length flash attention where it runs (CUDA, half precision); elsewhere SDPA with
    segment_mask."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        o = SegmentAttention.apply(*(t[0].transpose(0, 1) for t in (q, k, v)), segments, scale)  # (T, n_q, hd)
        return o.transpose(0, 1)[None]
    mask = segment_mask(segments.starts, q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class SegmentAttention(torch.autograd.Function):
    """Variable-length causal flash attention over a packed row: q (T, n_q, hd), k and v (T, n_kv, hd), each
    example attending to itself alone (segments.starts are flash's cumulative sequence lengths).

    Forward: per example, o = P v, P = softmax(scale q k^T + causal mask), with lse = logsumexp of each row of
    scale q k^T. Backward, flash's own, with P rebuilt blockwise from lse: dv = P^T do;
    dS = P * (do v^T - rowsum(do * o)); dq = scale dS k; dk = scale dS^T q.
    """

    @staticmethod
    def forward(ctx, q, k, v, segments: Segments, scale: float):
        starts, longest = segments
        o, lse, *rng, _ = torch.ops.aten._flash_attention_forward(q, k, v, starts, starts, longest, longest, 0.0,
                                                                  True, False, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse, starts, *rng)
        ctx.longest, ctx.scale = longest, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, starts, *rng = ctx.saved_tensors
        grads = torch.ops.aten._flash_attention_backward(do.contiguous(), q, k, v, o, lse, starts, starts, ctx.longest,
                                                         ctx.longest, 0.0, True, *rng, scale=ctx.scale)
        return *grads, None, None
