"""Loading a model whose 4-bit weights do not fit the card (load_streamed): each decoder linear read from the
checkpoint, quantized on the device and parked in pinned host memory before the next is read, so that neither the
device nor the host ever holds the model in 16 bits. prepare_for_training(stream=True) then streams the parked
weights (kernels/stream.py)."""

from __future__ import annotations

import glob
import os

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from .kernels.stream import streamed_tensors
from .model import QUANT_TYPES, decoder_layers, load_config, load_tokenizer


def load_streamed(name_or_dir: str, quant: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
                  tokenizer=None, config=None):
    """load_model's `(model, tokenizer)`, its decoder layers' 4-bit codes and block scales in pinned host memory
    (host memory on a CPU) and everything else on `device`: the same weights, bit for bit, for a model that does not
    fit there. A linear's weights are quantized on `device` (in `compute_dtype`, as load_model quantizes them), then
    parked; the code tables stay on the device. name_or_dir: a local checkpoint of .safetensors files, or a hub id
    (its .safetensors and .json files are downloaded first)."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"load_streamed loads 4-bit weights: quant={quant!r}; use one of {QUANT_TYPES}")
    config = config or load_config(name_or_dir)
    tok = load_tokenizer(tokenizer or name_or_dir) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, attn_implementation="sdpa")
    linears = {f"{name}.weight": name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and any(m is x for layer in decoder_layers(model) for x in layer.modules())}
    params = dict(model.named_parameters())
    for path in _safetensors(name_or_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in linears:
                    name = linears.pop(key)
                    _set_module(model, name, parked_4bit(model.get_submodule(name), f.get_tensor(key), quant,
                                                         double_quant, compute_dtype, device))
                elif key in params:
                    p = params.pop(key)
                    _set_param(model, key, f.get_tensor(key).to(device, p.dtype))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        params.pop("lm_head.weight", None)
    missing = [k for k in dict.fromkeys([*linears, *params]) if _get(model, k).is_meta]
    if missing:
        raise ValueError(f"{name_or_dir!r} lacks {len(missing)} weights the {type(model).__name__} needs, e.g. "
                         f"{missing[:3]}; load it with load_model")
    with torch.device(device):  # buffers (the rotary embedding's frequencies) computed there
        for name, module in model.named_modules():
            if any(b.is_meta for b in module.buffers(recurse=False)):
                _set_module(model, name, type(module)(config))
    model.name_or_path = name_or_dir
    return model, tok


def parked_4bit(linear: torch.nn.Linear, weight: torch.Tensor, quant: str, double_quant: bool, dtype: torch.dtype,
               device: torch.device):
    """A bnb Linear4bit in place of `linear`, holding `weight` quantized on `device`, its codes and block scales
    parked in (pinned) host memory."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype,
                          compress_statistics=double_quant, quant_type=quant, quant_storage=torch.uint8, device="meta")
    q.weight = bnb.nn.Params4bit(weight.to(device, dtype), requires_grad=False, quant_type=quant,
                                 compress_statistics=double_quant, quant_storage=torch.uint8).to(device)
    q.support_avx512bf16_for_cpu = False  # as load_model: the standard layout, which dequantize reads
    if linear.bias is not None and not linear.bias.is_meta:  # read before the weight
        q.bias = linear.bias
    for owner, name in streamed_tensors(q.weight):
        t = getattr(owner, name)
        setattr(owner, name, t.cpu().pin_memory() if t.is_cuda else t)
    return q


def _safetensors(name_or_dir: str) -> list[str]:
    if not os.path.isdir(name_or_dir):
        from huggingface_hub import snapshot_download

        name_or_dir = snapshot_download(name_or_dir, allow_patterns=["*.safetensors", "*.json"])
    files = sorted(glob.glob(os.path.join(name_or_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{name_or_dir!r} holds no .safetensors files; load it with load_model")
    return files


def _get(model, name: str):
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _set_param(model, name: str, tensor: torch.Tensor):
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, torch.nn.Parameter(tensor, requires_grad=False))


def _set_module(model, name: str, module: torch.nn.Module):
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)
