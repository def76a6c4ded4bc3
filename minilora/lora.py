"""minilora's LoRA layer, the one declaration of an adapter's settings, and the functions that put it into a model,
pick its parameters and merge it away.

LoRA (Hu et al., 2021, arXiv:2106.09685) learns a low-rank update of a frozen weight W:
    y = x W^T + s * x A^T B^T,    A: (r, in),  B: (out, r),  s = alpha / r (rsLoRA: alpha / sqrt(r))
DoRA (Liu et al., 2024, arXiv:2402.09353) also learns a magnitude m per output feature:
    y = (m / ||W + s B A||_row) * (x W^T + s x A^T B^T),  the norm treated as a constant (no gradient)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.dora import dora_scale
from .kernels.lora4bit import dequantize, is_4bit
from .kernels.stream import fetched, parked, streamed


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """An adapter's settings, declared once: add_lora builds LoRA layers from it, TrainConfig's fields make one
    (TrainConfig.lora), adapter_config.json and run.json record it, and the memory plan counts its tensors."""

    r: int = 64  # the rank of each update
    alpha: float = 16  # the update is scaled by alpha / r (rsLoRA: alpha / sqrt(r))
    dropout: float = 0.0  # dropout on the update's input
    targets: tuple = ("q_proj", "v_proj")  # the linears that carry it, by the last part of their name
    dtype: torch.dtype = torch.float32  # of the adapter's weights: fp32 master weights (the matmuls run in the
    # compute dtype)
    use_rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski, 2023, arXiv:2312.03732)
    use_dora: bool = False  # a trainable magnitude per output feature (DoRA)

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"LoRA rank r={self.r} must be a positive integer, e.g. r=8 or r=64")
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple]:
        """The trainable tensors of one adapted linear, by their name in the layer (and in PEFT's files)."""
        shapes = {"lora_A.weight": (self.r, in_features), "lora_B.weight": (out_features, self.r)}
        return {**shapes, "lora_magnitude_vector": (out_features,)} if self.use_dora else shapes

    def peft_config(self) -> dict:
        """The fields of PEFT's LoraConfig that describe it (adapter_config.json, with the base model's name)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": sorted(set(self.targets)),
                "use_rslora": self.use_rslora, "use_dora": self.use_dora,
                # PEFT's defaults, which describe minilora's layers: no bias, no extra trained modules
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "modules_to_save": None}

    @classmethod
    def from_peft(cls, config: dict) -> LoraSpec:
        return cls(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                   targets=config["target_modules"], use_rslora=bool(config.get("use_rslora")),
                   use_dora=bool(config.get("use_dora")))

    def record(self) -> dict:
        """Its fields as JSON values (run.json)."""
        return {**dataclasses.asdict(self), "targets": sorted(set(self.targets)), "dtype": str(self.dtype)}


class LoRALinear(nn.Module):
    """A frozen linear (`nn.Linear` or bitsandbytes `Linear4bit`) plus a trainable low-rank update, as `spec` (a
    LoraSpec; its targets are add_lora's business) says."""

    def __init__(self, base: nn.Module, spec: LoraSpec):
        super().__init__()
        self.spec = spec = dataclasses.replace(spec, targets=())
        self.base = base.requires_grad_(False)
        self.scaling = spec.scaling
        # fp32 by default: these are the master weights that AdamW updates; an update of lr 2e-4 on a weight
        # near 1e-2 is below bf16's resolution, and bf16 adapters measurably fall behind PEFT's fp32 ones.
        # The matmuls still run in the compute dtype (autocast, or the fast layers' own casts).
        kw = dict(bias=False, dtype=spec.dtype, device=compute_device(base))
        self.lora_A = nn.Linear(base.in_features, spec.r, **kw)  # (r, in)
        self.lora_B = nn.Linear(spec.r, base.out_features, **kw)  # (out, r)
        # A as nn.Linear's default init (Kaiming-uniform, a=sqrt(5)) and B = 0, as in the LoRA paper's reference
        # code and PEFT: the update starts at exactly zero, so step 0 is the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if spec.use_dora:  # the magnitude starts at ||W||_row, as B = 0 makes W + s B A: again the base model at step 0
            with torch.no_grad(), fetched(base):  # (a weight loaded for streaming waits in host memory)
                norm = torch.linalg.vector_norm(dequantize(base, torch.float32), dim=1)  # (out,)
            self.lora_magnitude_vector = nn.Parameter(norm.to(spec.dtype))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.merged = False

    def adapter_tensors(self) -> list[nn.Parameter]:
        """The trainable tensors, in spec.shapes' order: what every path that computes this layer must take."""
        return [self.get_parameter(name) for name in self.spec.shapes(1, 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts the weights to x's dtype itself
            h = h.to(self.lora_A.weight.dtype)
        y, update = self.base(x), self.scaling * self.lora_B(self.lora_A(h))
        if not self.spec.use_dora:
            return y + update.to(x.dtype)
        # DoRA: y + (g - 1) * (h W^T) + g * update, g = m / ||W + s B A||_row, which is g * (x W^T + update)
        # without dropout; PEFT's formula, h W^T computed again only where dropout made h differ from x
        W = dequantize(self.base, update.dtype)
        g = dora_scale(W, self.lora_A.weight, self.lora_B.weight, self.scaling, self.lora_magnitude_vector)
        base_h = F.linear(h.to(W.dtype), W) if h is not x else y - (0 if self.base.bias is None else self.base.bias)
        return y + ((g - 1) * base_h.to(update.dtype) + g * update).to(x.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the update into a plain (dequantized) linear, mark this layer merged and return the linear.

        Idempotent: merging again returns the same linear. The linear has the compute dtype (bf16 for a
        4-bit base), since a 4-bit weight cannot hold the update.
        """
        if not self.merged:
            delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # (out, in), fp32
            factor = None
            if self.spec.use_dora:  # W' = m / ||W + s B A||_row * (W + s B A)
                factor = dora_scale(dequantize(self.base, torch.float32), self.lora_A.weight.float(),
                                    self.lora_B.weight.float(), self.scaling, self.lora_magnitude_vector.float())
            self.base = plain_linear(self.base, extra=delta, factor=factor)
            self.merged = True
        return self.base

    def extra_repr(self) -> str:
        return (f"r={self.spec.r}, alpha={self.spec.alpha}, scaling={self.scaling:g}"
                f"{', rsLoRA' if self.spec.use_rslora else ''}"
                f"{', DoRA' if self.spec.use_dora else ''}, merged={self.merged}")


def compute_device(base: nn.Module) -> torch.device:
    """Where a base linear computes: its weight's device, or for a 4-bit base its code table's (the codes of a
    model loaded for streaming wait in host memory: host_load.load_streamed)."""
    state = getattr(base.weight, "quant_state", None) if is_4bit(base) else None
    return state.code.device if state is not None else base.weight.device


@torch.no_grad()
def plain_linear(base: nn.Module, extra: torch.Tensor | None = None, factor: torch.Tensor | None = None) -> nn.Linear:
    """An `nn.Linear` in the base's compute dtype holding its (dequantized) weight, plus `extra` if given, its rows
    times `factor` (out,) if given."""
    w = dequantize(base, torch.float32)  # (out, in)
    w = w if extra is None else w + extra
    w = w if factor is None else factor[:, None] * w
    dtype = (base.compute_dtype or torch.float32) if is_4bit(base) else base.weight.dtype
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype, device=w.device)
    out.weight.copy_(w)
    if base.bias is not None:
        out.bias.copy_(base.bias)
    return out.requires_grad_(False)


def add_lora(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 64, alpha: float = 16, dropout: float = 0.0,
             dtype: torch.dtype | None = None, use_rslora: bool = False, use_dora: bool = False) -> list[str]:
    """Replace every linear whose name ends with one of `targets` by a `LoRALinear`; return the replaced names.

    dtype: the LoRA weights' dtype, float32 by default (master weights; the compute stays in autocast's
    dtype). torch.bfloat16 halves their memory, as the QLoRA reference does, at some cost in accuracy.
    use_rslora, use_dora: as PEFT's LoraConfig (LoraSpec). A model that has LoRA already takes more only on other
    targets, with the same settings: the model holds one adapter.
    """
    spec = LoraSpec(r, alpha, dropout, (), dtype or torch.float32, use_rslora, use_dora)
    existing = lora_layers(model)
    inside = tuple(f"{name}." for name in existing)  # a LoRALinear's own linears (base, lora_A, lora_B)
    linears = [n for n, m in model.named_modules()
               if (isinstance(m, nn.Linear) or is_4bit(m)) and not n.startswith(inside)]
    targets = check_targets(linears + list(existing), targets)
    if existing:
        carrying = sorted({n.split(".")[-1] for n in existing} & set(targets))
        have, *others = {m.spec for m in existing.values()}
        if carrying:
            raise ValueError(f"targets {carrying} already carry LoRA ({_settings(have)}); train or save that adapter "
                             "as it is, or load the model again to add a new one")
        if others or have != spec:
            raise ValueError(f"the model's LoRA has {_settings(have)}, and one adapter has one setting: add LoRA on "
                             f"{list(targets)} with those, or load the model again")
    names = [n for n in linears if n.split(".")[-1] in targets]
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), spec))
    mark_only_lora_trainable(model)
    return names


def _settings(spec: LoraSpec) -> str:
    extra = "".join(f", {k}=True" for k in ("use_rslora", "use_dora") if getattr(spec, k))
    return f"r={spec.r}, alpha={spec.alpha}, dropout={spec.dropout}{extra}"


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
    """Freeze every parameter except the adapters' own (A and B, and DoRA's magnitudes)."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        for t in layer.adapter_tensors():
            t.requires_grad_(not layer.merged)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by name: {"model.layers.0.self_attn.q_proj.lora_A.weight": tensor, ...}."""
    return {f"{name}.{key}": t for name, layer in lora_layers(model).items()
            for key, t in zip(layer.spec.shapes(1, 1), layer.adapter_tensors())}


def is_merged(model: nn.Module) -> bool:
    """Whether LoRA updates were folded into the model's weights (merge_lora, or one LoRALinear's merge)."""
    return getattr(model, "lora_merged", False) or any(m.merged for m in lora_layers(model).values())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and leave a plain model: no LoRA, no 4-bit layer.

    Every linear ends up an `nn.Linear` in the compute dtype (4-bit ones are dequantized too), so
    `model.save_pretrained(dir)` writes an ordinary checkpoint that `LlamaForCausalLM.from_pretrained` loads.
    Idempotent: merging a merged model changes nothing.
    """
    if any(streamed(m) or parked(m) for m in model.modules()):
        raise ValueError("the model's 4-bit weights wait in host memory (load_streamed, or prepare_for_training("
                         "stream=True)), so most of them are not on the device: merge a copy loaded with "
                         "load_model(device='cpu') and the saved adapter, or prepare_for_training(model) without "
                         "stream first if they fit")
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merge())
        model.lora_merged = True  # is_merged: no adapter trained from here applies to the base model
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            _replace(model, name, plain_linear(module))
    if getattr(model, "hf_quantizer", None) is not None:  # the config must not claim 4-bit weights any more
        model.hf_quantizer.remove_quantization_config(model)
    return model
