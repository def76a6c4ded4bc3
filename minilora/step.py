"""A micro-batch's forward and backward (Stepper): eagerly, or through a run's FastPath, and (data-parallel) the
LoRA gradients kept in one buffer that one all-reduce a step sums."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import autocast
from .fsdp import is_sharded
from .loss import causal_lm_loss
from .processes import in_process_group


class Stepper:
    """Forward and backward of one micro-batch: the gradient of loss_sum / n_step goes into the LoRA .grad.

    Eagerly: causal_lm_loss under autocast, and its backward (through the GradScaler, which scales fp16 losses so
    that small gradients survive). With a FastPath (fast_path.py): each batch shape's checkpointing before its
    forward, and the steps replayed as CUDA graphs where the run takes them.
    In a torch.distributed process group the LoRA gradients are views of one flat buffer per dtype, kept through
    the run, and `reduce` sums it over the processes once per optimizer step: each process's loss is already
    divided by the global step's supervised tokens, so the sum is the global step's gradient.
    """

    def __init__(self, model, chunk: int, precision: str, scaler: torch.amp.GradScaler, fast=None):
        self.model, self.chunk, self.precision, self.scaler, self.fast = model, chunk, precision, scaler, fast
        self.device = model.lm_head.weight.device  # not the first parameter's: the embedding may be on the host
        self.params = [p for p in model.parameters() if p.requires_grad]  # the LoRA weights
        # a sharded model's gradients are FSDP's: reduce-scattered by its backward hooks
        self.flat = _flat_grads(self.params) if in_process_group() and not is_sharded(model) else []
        self.graphs = fast.graphed(self._loss) if fast else None  # kernels/graphs.GraphedSteps

    def _loss(self, batch: dict) -> torch.Tensor:
        if self.fast:
            self.fast.prepare(batch)
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
