"""NF4 dequantization of a bitsandbytes 4-bit weight in one Triton kernel (CUDA only).

bitsandbytes' `dequantize_4bit` of a double-quantized weight runs three kernels and a few Python steps:
dequantize the 8-bit block scales (`dequantize_blockwise`), add their offset, then dequantize the 4-bit
values. Here one kernel reads each packed byte once and writes its two values:

    w[2i], w[2i+1] = nf4[byte_i >> 4] * s_b,  nf4[byte_i & 15] * s_b,   b = 2i // blocksize
    s_b = code2[absmax_q[b]] * absmax2[b // 256] + offset     (double quant; else s_b = absmax[b])

in fp32, rounded once to the output dtype, in the order bitsandbytes computes it: the scale's product is
rounded before the offset is added (`mul.rn` keeps the compiler from fusing them into one FMA), so the result
is bit for bit bitsandbytes' (tests/test_kernels.py checks it on a GPU).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU-only torch): bitsandbytes dequantizes
    triton = None

BLOCK = 1024  # packed bytes per program: 2048 values


def supported(weight, dtype: torch.dtype) -> bool:
    """Whether the kernel can dequantize this Params4bit into a contiguous tensor of `dtype`."""
    qs = weight.quant_state
    on_device = weight.data.is_cuda or weight.data.is_pinned()  # pinned: streamed to the device (stream.py)
    return (triton is not None and on_device and qs.quant_type == "nf4"
            and dtype in (torch.bfloat16, torch.float16, torch.float32) and qs.blocksize % 2 == 0
            and (not qs.nested or qs.offset.is_cuda) and weight.data.is_contiguous())


def dequantize_nf4(weight, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized weight (quant_state.shape) into `out` and return it."""
    qs = weight.quant_state
    n_bytes = weight.data.numel()
    if out.numel() != 2 * n_bytes:
        raise ValueError(f"out has {out.numel()} values; the weight holds {2 * n_bytes}")
    nested = bool(qs.nested)
    absmax = qs.absmax
    code2, absmax2, offset = ((qs.state2.code, qs.state2.absmax, qs.offset) if nested else (absmax, absmax, absmax))
    _kernel[(triton.cdiv(n_bytes, BLOCK),)](weight.data, out, n_bytes, (qs.code, absmax, code2, absmax2, offset),
                                            HALF_BLOCK=qs.blocksize // 2,
                                            NESTED_BLOCK=qs.state2.blocksize if nested else 0)
    return out


if triton is not None:

    @triton.jit
    def _mul_rn(a, b):  # a * b rounded on its own, never fused with a following add
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)

    _BLOCK = tl.constexpr(BLOCK)

    @triton.jit
    def _kernel(q_ptr, out_ptr, n_bytes, state, HALF_BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr):
        """state: the quant state's tensors (the 16-value table, absmax, and for NESTED_BLOCK > 0 the 8-bit
        absmax's code, its absmax per NESTED_BLOCK blocks and the offset)."""
        table_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr = state
        pid = tl.program_id(0)
        offs = pid * _BLOCK + tl.arange(0, _BLOCK)  # packed bytes
        mask = offs < n_bytes
        byte = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        block = offs // HALF_BLOCK
        if NESTED_BLOCK > 0:
            a = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            s = _mul_rn(tl.load(code2_ptr + a, mask=mask, other=0.0), tl.load(absmax2_ptr + block // NESTED_BLOCK,
                                                                                mask=mask, other=0.0))
            scale = s + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        hi = tl.load(table_ptr + (byte >> 4), mask=mask, other=0.0) * scale
        lo = tl.load(table_ptr + (byte & 15), mask=mask, other=0.0) * scale
        values = tl.interleave(hi, lo)  # (2 * BLOCK,): hi0, lo0, hi1, lo1, ...
        out_offs = pid * 2 * _BLOCK + tl.arange(0, 2 * _BLOCK)
        tl.store(out_ptr + out_offs, values.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)
