"""A micro-batch's forward and backward (Stepper): run eagerly or as a replayed CUDA graph, with each batch shape's
checkpointing, and (data-parallel) the LoRA gradients kept in one buffer that one all-reduce a step sums."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from .config import PRECISIONS, TrainConfig, autocast
from .kernels.graphs import PAD_MULTIPLE, GraphedSteps
from .kernels.layer import capturable, set_checkpointing
from .fsdp import is_sharded
from .loss import causal_lm_loss
from .plan import PlanOptions
from .processes import in_process_group


class Stepper:
    """Forward and backward of one micro-batch: the gradient of loss_sum / n_step goes into the LoRA .grad.

    graphs: GraphedSteps' options, and each batch shape's step is a replayed CUDA graph (kernels/graphs.py);
    None: eager steps. shape_plan: (rows, tokens a row) -> the PlanOptions of micro-batches of that shape
    (plan_choice.shape_options), whose checkpointing the fast layers take before its forward; None: as prepared.
    In a torch.distributed process group the LoRA gradients are views of one flat buffer per dtype, kept through
    the run, and `reduce` sums it over the processes once per optimizer step: each process's loss is already
    divided by the global step's supervised tokens, so the sum is the global step's gradient.
    """

    def __init__(self, model, chunk: int, precision: str, graphs: dict | None = None, scaler=None,
                 shape_plan: Callable[[int, int], PlanOptions] | None = None):
        self.model, self.chunk, self.precision, self.scaler = model, chunk, precision, scaler
        self.shape_plan, self.shapes = shape_plan, {}  # (B, T) -> (checkpointed layers, keep_weights)
        self.device = model.lm_head.weight.device  # not the first parameter's: the embedding may be on the host
        self.params = [p for p in model.parameters() if p.requires_grad]  # the LoRA weights
        # a sharded model's gradients are FSDP's: reduce-scattered by its backward hooks
        self.flat = _flat_grads(self.params) if in_process_group() and not is_sharded(model) else []
        self.graphs = GraphedSteps(self.params, self._loss, **graphs) if graphs is not None else None

    def _loss(self, batch: dict) -> torch.Tensor:
        if self.shape_plan is not None:  # eager, or a graph's capture: what the forward runs is decided now
            shape = tuple(batch["input_ids"].shape)
            if shape not in self.shapes:
                o = self.shape_plan(*shape)
                self.shapes[shape] = o.layers_checkpointed(self.model.config.num_hidden_layers), o.keep_weights
            set_checkpointing(self.model, *self.shapes[shape])
        return causal_lm_loss(self.model, batch, self.chunk)[0]

    def __call__(self, batch: dict, n_step: int) -> torch.Tensor:
        """The micro-batch's summed loss, a GPU scalar (no wait). The batch is consumed: emptied once read, so
        that no tensor of it outlives its use (the embedded rows of a host table are the first layer's input,
        which an offloaded step keeps on the host only)."""
        with autocast(self.device, self.precision):
            if self.graphs:
                return self.graphs(batch, 1.0 / n_step)
            loss = self._loss(batch)
            batch.clear()
            self.scaler.scale(loss / n_step).backward()
        return loss.detach()

    def reduce(self):
        """Sum the LoRA gradients over the processes (none without a process group)."""
        for flat in self.flat:
            dist.all_reduce(flat)

    @property
    def keeps_grads(self) -> bool:
        """Whether the gradients live at fixed addresses through the run (zeroed, never freed)."""
        return bool(self.flat) or self.graphs is not None


def _flat_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """One zeroed buffer per dtype, and each parameter's .grad a view of it: one all-reduce a step, no copies."""
    buffers = []
    for dtype in dict.fromkeys(p.dtype for p in params):
        group = [p for p in params if p.dtype == dtype]
        flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=group[0].device)
        for p, view in zip(group, flat.split([p.numel() for p in group])):
            p.grad = view.view_as(p)
        buffers.append(flat)
    return buffers


def make_stepper(model, cfg: TrainConfig, options: PlanOptions,
                 shape_plan: Callable[[int, int], PlanOptions] | None = None) -> Stepper:
    """The Stepper of a model prepared as `options` say: each batch shape's step a replayed CUDA graph where that
    can be (capturable fast layers, a plan with room for the graphs, no GradScaler), else eager; fp16 steps scale
    the loss (GradScaler), so that small grads survive. shape_plan: as Stepper takes it."""
    device = model.lm_head.weight.device  # not the first parameter: the embedding may be on the host
    graphs = (options.graphs and device.type == "cuda" and cfg.precision != "fp16" and options.fast
              and capturable(model, PRECISIONS[cfg.precision]))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    max_tokens = cfg.batch_size * math.ceil(cfg.max_len / PAD_MULTIPLE) * PAD_MULTIPLE
    return Stepper(model, options.loss_chunk, cfg.precision, scaler=scaler, shape_plan=shape_plan, graphs=dict(
        eager_first_per_shape=options.offload, max_tokens=max_tokens) if graphs else None)


