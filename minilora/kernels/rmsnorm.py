"""LlamaRMSNorm for the fast layer: the same formula, keeping less for the backward, in torch's fused CUDA kernels
where the build has them."""

from __future__ import annotations

import torch

# torch's own fused RMSNorm kernels, where this build has them for CUDA; otherwise the formula in plain ops
FUSED_RMS_NORM = all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
                     for op in ("aten::_fused_rms_norm", "aten::_fused_rms_norm_backward"))


def rms_norm(x, norm):
    """x through `norm` (a LlamaRMSNorm), by RMSNorm."""
    return RMSNorm.apply(x, norm.weight, norm.variance_epsilon)


class RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm, w * (x / rms(x)) computed in fp32, keeping only x and the (N, 1) fp32 1/rms for the
    backward (autograd through transformers' version also keeps fp32 copies of x). On CUDA it runs torch's
    fused kernels, one launch each way, where the build has them; elsewhere the same formula in plain ops.

    Forward: y = w * n, n = x r, r = 1 / sqrt(mean(x^2) + eps) over the last dim. Backward: with gn = g w,
    dx = r (gn - n mean(gn n)); the weight (frozen) gets no gradient.
    """

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
