"""DoRA in the fused projections (kernels/lora4bit.Projection): a member whose adapter has a magnitude vector has
its rows of the projection's output rescaled, as PEFT's DoRA layer computes them and minilora's LoRALinear does
(minilora/lora.py):

    y = b + x W^T + (g - 1) (xl W^T) + g s (xl A^T) B^T,    g = m / ||W + s B A||_row  (the norm without grad)

which is b + g (x W^T + s x A^T B^T) when there is no dropout (xl = x). Like every kernel here it reads the adapted
linear's modules by name: lora_A, lora_B, lora_magnitude_vector, scaling.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def dora_scale(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor
               ) -> torch.Tensor:
    """DoRA's factor of each output row, m / ||W + s B A||_row: (out,), in the magnitude's dtype. The norm is taken
    in W's dtype and without grad: DoRA's paper (section 4.3) treats it as a constant, as PEFT does."""
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.addmm(W, B.to(W.dtype), A.to(W.dtype), alpha=scaling), dim=1)
    return magnitude / norm.to(magnitude.dtype)


def dora_rows(projection, y: torch.Tensor, dora: dict, dtype: torch.dtype) -> torch.Tensor:
    """A projection's output y (..., out: x W^T + b + s xl A^T B^T for each member) with each DoRA member's rows
    rescaled as the module docstring says; dora: {a member's first row: (the member, xl, its dropped-out input,
    or None without dropout)}."""
    out = []
    for j, rows in enumerate(projection.rows):
        if rows.start not in dora:
            out.append(y[..., rows])
            continue
        (m, xl), W = dora[rows.start], projection.member_weight(j, dtype)  # W: (out_j, in)
        g = dora_scale(W, m.lora_A.weight, m.lora_B.weight, m.scaling, magnitude(m)).to(dtype)
        if xl is None:
            b = 0 if projection.bases[j].bias is None else projection.bases[j].bias.to(dtype)
            out.append(b + g * (y[..., rows] - b))
        else:
            A, B = m.lora_A.weight.to(dtype), m.lora_B.weight.to(dtype)
            out.append(y[..., rows] + (g - 1) * (xl @ W.t() + m.scaling * (xl @ A.t()) @ B.t()))
    return torch.cat(out, dim=-1)


def magnitude(member: nn.Module) -> torch.Tensor | None:
    """A DoRA member's magnitude vector (out,), or None for a LoRA one."""
    return getattr(member, "lora_magnitude_vector", None)


def computes(member: nn.Module) -> bool:
    """Whether a projection computes every trainable tensor of this adapted linear (its adapter_tensors): A and
    B, and DoRA's magnitude. An adapter of any other kind is refused, never computed without its own tensors."""
    known = [member.lora_A.weight, member.lora_B.weight] + ([magnitude(member)] if magnitude(member) is not None
                                                             else [])
    return [id(t) for t in member.adapter_tensors()] == [id(t) for t in known]
