"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`): the 4-bit base and the LoRA
weights split over the processes, one shard each, so that a model larger than one card trains on several.

bitsandbytes' 4-bit weight (`Params4bit`) keeps its quantization state on the tensor, which sharding into a
DTensor drops. So each 4-bit linear becomes an `NF4Linear` first: the packed bytes and the per-block scales are
plain frozen parameters (their bytes as bf16 elements: FSDP2 makes every shard a parameter that could require
grad, which an integer dtype cannot), sharded on dim 0 and all-gathered before a layer runs; the small
tables (the 16-value code, the nested scales) stay whole on every process. Its forward dequantizes the gathered
weight with bitsandbytes, the same arithmetic as the unsharded layer.

Each decoder layer is one FSDP unit and the LlamaForCausalLM the root, so that evaluation and transformers'
`generate` gather the weights through the model's own forward. minilora's loss bypasses that forward, so it is a
method registered with FSDP (`model.sharded_loss`, which loss.causal_lm_loss calls). The loss is already divided
by the global step's supervised tokens, so the processes' gradients are summed, not averaged. Checkpoints and the
adapter hold full tensors, gathered to process 0: the same files one process writes (the optimizer state keyed by
parameter name).
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from .kernels.lora4bit import _standard_layout, bnb, is_4bit  # bnb: None without bitsandbytes, then no 4-bit layer
from .loss import decoder_loss
from .model import decoder_layers

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


class NF4Linear(nn.Module):
    """A frozen bitsandbytes 4-bit linear whose packed weight (out x in / 2 bytes) and per-block scales are
    ordinary 1-D parameters that FSDP2 can shard; the rest of its quantization state is kept whole."""

    def __init__(self, base: nn.Module):
        super().__init__()
        w = _standard_layout(base.weight)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype = base.compute_dtype
        self.weight = _as_float(w.data.as_subclass(torch.Tensor))  # not a Params4bit, whose state sharding drops
        self.absmax = _as_float(w.quant_state.absmax)  # uint8 when nested, else fp32
        self.absmax_dtype = w.quant_state.absmax.dtype
        self.quant_state = copy.copy(w.quant_state)  # shallow: the code and nested state, shared
        self.quant_state.absmax = None  # only the (gathered) parameter holds it
        self.bias = None if base.bias is None else nn.Parameter(base.bias.data, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = copy.copy(self.quant_state)
        state.absmax = self.absmax.view(self.absmax_dtype)  # gathered with the weight
        dtype = self.compute_dtype or x.dtype
        w = bnb.functional.dequantize_4bit(self.weight.view(torch.uint8).view(-1, 1), state).to(dtype)  # (out, in)
        return F.linear(x.to(dtype), w, None if self.bias is None else self.bias.to(dtype)).to(x.dtype)

    def place_tables(self, device: torch.device):
        """The tables kept whole (the code, the nested scales) on `device`, where FSDP puts the shards."""
        s = self.quant_state
        s.code = s.code.to(device)
        if s.nested:
            nested = (s.offset, s.state2.absmax, s.state2.code)
            s.offset, s.state2.absmax, s.state2.code = (t.to(device) for t in nested)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, shardable"


def _as_float(t: torch.Tensor) -> nn.Parameter:
    """t's bytes as a frozen 1-D parameter of a float dtype (bf16: 2 bytes an element): FSDP2 gives every shard
    a parameter that could require grad, which only float dtypes can."""
    flat = t.reshape(-1)
    if flat.dtype.is_floating_point:
        return nn.Parameter(flat, requires_grad=False)
    if flat.numel() % 2:
        raise ValueError(f"a 4-bit weight's tensor of {flat.numel()} bytes cannot be sharded as 2-byte elements")
    return nn.Parameter(flat.view(torch.bfloat16), requires_grad=False)


def training_device(model) -> torch.device:
    """Where a sharded model trains: this process's GPU when it has one (the model may wait in host memory until
    it is sharded, so that no GPU ever holds all of it), else where the model is."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else next(
        model.parameters()).device


def shard(model, device: torch.device):
    """Shard `model` (a causal LM with its LoRA layers, in a process group) over the processes, each
    process's shards on `device`: every 4-bit linear made an NF4Linear, each decoder layer an FSDP unit, the
    model the root."""
    from torch.distributed.device_mesh import init_device_mesh

    for name in [n for n, m in model.named_modules() if is_4bit(m)]:
        parent, _, child = name.rpartition(".")
        nf4 = NF4Linear(model.get_submodule(name))
        nf4.place_tables(device)
        setattr(model.get_submodule(parent), child, nf4)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    model.sharded_loss = types.MethodType(decoder_loss, model)  # causal_lm_loss calls it
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "sharded_loss")
    for unit in model.modules():
        if isinstance(unit, FSDPModule):  # sum the gradients (a plain SUM: gloo has no pre-multiplied one)
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def full_lora_weights(model) -> dict:
    """The LoRA weights as full CPU tensors on process 0 (empty elsewhere), keyed as lora_state_dict's; every
    process must call it."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state as full CPU tensors on process 0 (empty elsewhere), keyed by parameter name; every
    process must call it."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_optimizer_state(model, optimizer, state: dict):
    """Put a full_optimizer_state (every process passes the same) into the sharded model's optimizer."""
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
