"""minilora's LoRA layer and the functions that put it into a model, pick its parameters and merge it away.

LoRA (Hu et al., 2021, arXiv:2106.09685) learns a low-rank update of a frozen weight W:
    y = x W^T + (alpha / r) * x A^T B^T,    A: (r, in),  B: (out, r)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .kernels.lora4bit import Projection, dequantize, is_4bit


class LoRALinear(nn.Module):
    """A frozen linear (`nn.Linear` or bitsandbytes `Linear4bit`) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r={r} must be a positive integer, e.g. r=8 or r=64")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # fp32 by default: these are the master weights that AdamW updates; an update of lr 2e-4 on a weight
        # near 1e-2 is below bf16's resolution, and bf16 adapters measurably fall behind PEFT's fp32 ones.
        # The matmuls still run in the compute dtype (autocast, or the fused path's own casts).
        kw = dict(bias=False, dtype=dtype or torch.float32, device=base.weight.device)
        self.lora_A = nn.Linear(base.in_features, r, **kw)  # (r, in)
        self.lora_B = nn.Linear(r, base.out_features, **kw)  # (out, r)
        # A as nn.Linear's default init (Kaiming-uniform, a=sqrt(5)) and B = 0, as in the LoRA paper's reference
        # code and PEFT: the update starts at exactly zero, so step 0 is the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)
        self.merged = False
        self.fused = False  # training forward through one autograd function (prepare_for_training(fused=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.fused and self.training and not torch.compiler.is_compiling():
            # the same formula as one autograd function (minilora/kernels/lora4bit.py). Under torch.compile the
            # plain formula is traced instead: inductor fuses it itself, and the fused function traced on CUDA
            # gave zero LoRA gradients (benchmarks/check_fastpaths.py, torch 2.11).
            return Projection([self])(x).to(x.dtype)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts the weights to x's dtype itself
            h = h.to(self.lora_A.weight.dtype)
        return self.base(x) + (self.scaling * self.lora_B(self.lora_A(h))).to(x.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the update into a plain (dequantized) linear, mark this layer merged and return the linear.

        Idempotent: merging again returns the same linear. The linear has the compute dtype (bf16 for a
        4-bit base), since a 4-bit weight cannot hold the update.
        """
        if not self.merged:
            delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # (out, in), fp32
            self.base = plain_linear(self.base, extra=delta)
            self.merged = True
        return self.base

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


@torch.no_grad()
def plain_linear(base: nn.Module, extra: torch.Tensor | None = None) -> nn.Linear:
    """An `nn.Linear` in the base's compute dtype holding its (dequantized) weight, plus `extra` if given."""
    w = dequantize(base, torch.float32)  # (out, in)
    dtype = (base.compute_dtype or torch.float32) if is_4bit(base) else base.weight.dtype
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype, device=w.device)
    out.weight.copy_(w if extra is None else w + extra)
    if base.bias is not None:
        out.bias.copy_(base.bias)
    return out.requires_grad_(False)


def add_lora(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 64, alpha: float = 16, dropout: float = 0.0,
             dtype: torch.dtype | None = None) -> list[str]:
    """Replace every linear whose name ends with one of `targets` by a `LoRALinear`; return the replaced names.

    dtype: the LoRA weights' dtype, float32 by default (master weights; the compute stays in autocast's
    dtype). torch.bfloat16 halves their memory, as the QLoRA reference does, at some cost in accuracy.
    A model that has LoRA already takes more only on other targets, with the same r, alpha and dropout: the
    model holds one adapter.
    """
    existing = lora_layers(model)
    inside = tuple(f"{name}." for name in existing)  # a LoRALinear's own linears (base, lora_A, lora_B)
    linears = [n for n, m in model.named_modules()
               if (isinstance(m, nn.Linear) or is_4bit(m)) and not n.startswith(inside)]
    targets = check_targets(linears + list(existing), targets)
    if existing:
        carrying = sorted({n.split(".")[-1] for n in existing} & set(targets))
        (r0, alpha0, dropout0), *others = {(m.r, m.alpha, m.dropout_p) for m in existing.values()}
        if carrying:
            raise ValueError(f"targets {carrying} already carry LoRA (r={r0}, alpha={alpha0}, dropout={dropout0}); "
                             "train or save that adapter as it is, or load the model again to add a new one")
        if others or (r0, alpha0, dropout0) != (r, alpha, dropout):
            raise ValueError(f"the model's LoRA has r={r0}, alpha={alpha0}, dropout={dropout0}, and one adapter has "
                             f"one setting: add LoRA on {list(targets)} with those, or load the model again")
    names = [n for n in linears if n.split(".")[-1] in targets]
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, dtype))
    mark_only_lora_trainable(model)
    return names


def check_targets(linear_names: list[str], targets) -> tuple[str, ...]:
    """Raise ValueError unless every target names a linear layer of the decoder (by the last part of its name);
    return the targets as a tuple. lm_head is not one: minilora's loss reads its weight directly, so LoRA there
    would never train."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    existing = sorted({n.split(".")[-1] for n in linear_names} - {"lm_head"})
    bad = [t for t in targets if t not in existing]
    if bad or not targets:
        why = "lm_head cannot carry LoRA here (the loss reads its weight directly)" if "lm_head" in bad else (
            f"{bad} match no linear layer" if bad else "no target given")
        raise ValueError(f"targets={list(targets)}: {why}; the model's linear layers are {existing}")
    return targets


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the LoRA A and B matrices."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(not layer.merged)
        layer.lora_B.requires_grad_(not layer.merged)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights by module name: {"model.layers.0.self_attn.q_proj.lora_A.weight": tensor, ...}."""
    return {f"{name}.{ab}.weight": getattr(layer, ab).weight
            for name, layer in lora_layers(model).items() for ab in ("lora_A", "lora_B")}


def is_merged(model: nn.Module) -> bool:
    """Whether LoRA updates were folded into the model's weights (merge_lora, or one LoRALinear's merge)."""
    return getattr(model, "lora_merged", False) or any(m.merged for m in lora_layers(model).values())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and leave a plain model: no LoRA, no 4-bit layer.

    Every linear ends up an `nn.Linear` in the compute dtype (4-bit ones are dequantized too), so
    `model.save_pretrained(dir)` writes an ordinary checkpoint that `LlamaForCausalLM.from_pretrained` loads.
    Idempotent: merging a merged model changes nothing.
    """
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merge())
        model.lora_merged = True  # is_merged: no adapter trained from here applies to the base model
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            _replace(model, name, plain_linear(module))
    if getattr(model, "hf_quantizer", None) is not None:  # the config must not claim 4-bit weights any more
        model.hf_quantizer.remove_quantization_config(model)
    return model
