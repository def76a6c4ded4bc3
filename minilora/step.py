"""One optimizer step: this process's micro-batches, each one's forward and backward run eagerly or as a replayed
CUDA graph, then (data-parallel) one all-reduce of the LoRA gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .config import PRECISIONS, TrainConfig, autocast
from .data import batches, packs
from .kernels.graphs import PAD_MULTIPLE, GraphedSteps
from .kernels.layer import capturable, set_checkpointing
from .fsdp import is_sharded
from .loss import causal_lm_loss, supervised_count
from .plan import PlanOptions
from .template import IGNORE


@dataclass
class Feed:
    """The stream of micro-batches. Global micro-batch k holds what one process at batch world x batch_size
    would take as its batch k, and process `rank` takes every world-th example of it; with pack_tokens, it
    holds `world` packs (data.packs) of that many tokens, one for each process."""

    examples: list[dict]
    batch_size: int  # per process
    seed: int
    group_by_length: bool
    collate: Callable  # examples -> a CPU batch (Collator)
    move: Callable  # a CPU batch -> one on the device, ready for the loss (loss.to_device)
    rank: int = 0
    world: int = 1
    pack_tokens: int | None = None

    @cached_property
    def per_epoch(self) -> int:
        """Global micro-batches in one pass over the examples (the first pass: packs may differ by a few)."""
        return len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[list[dict]]]:
        """The global micro-batches of one pass, each as the examples of every process."""
        if self.pack_tokens:
            groups = packs(self.examples, self.pack_tokens, self.seed, epoch)
            return [groups[i:i + self.world] for i in range(0, len(groups), self.world)]
        order = batches(self.examples, self.batch_size * self.world, self.seed,
                        group_by_length=self.group_by_length, epoch=epoch)
        return [[batch[r::self.world] for r in range(self.world)] for batch in order]

    def stream(self, start: int) -> Iterator[tuple[dict, int]]:
        """(this process's micro-batch on the device, supervised tokens of the global one) from micro-batch
        `start` on: a pure function of (seed, position), the same in every process, so a run resumes mid-epoch."""
        epoch = 0
        while True:
            shares = self._epoch(epoch)
            for share in shares[start:]:
                mine = share[self.rank] if self.rank < len(share) and share[self.rank] else _unsupervised(share[0])
                n = sum(supervised_count(ex["labels"]) for part in share for ex in part)  # the same everywhere
                yield self.move(self.collate(mine)), n  # the copies to the device are asynchronous
            start, epoch = max(0, start - len(shares)), epoch + 1


def _unsupervised(examples: list[dict]) -> list[dict]:
    """A copy of the first example that supervises nothing: the input of a process whose share of a short last
    global batch is empty. It takes part in the step (the all-reduce needs every process there) and adds nothing."""
    return [{**examples[0], "labels": [IGNORE] * len(examples[0]["labels"])}]


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


def in_process_group() -> bool:
    """Whether this process trains in a torch.distributed process group (of any size, one included)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without a torch.distributed process group."""
    return (dist.get_rank(), dist.get_world_size()) if in_process_group() else (0, 1)


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


def optimizer_step(stepper: Stepper, micro: list[tuple[dict, int]], opt, sched, max_grad_norm: float):
    """One optimizer step over its micro-batches: (summed loss, supervised tokens, pre-clip grad norm), the loss
    and norm as GPU scalars."""
    # Normalise by the supervised tokens of the whole optimizer step, so that batch 4 x accumulation 1 and batch
    # 1 x accumulation 4 give the same gradient (a per-micro-batch mean would weight short examples more). The
    # count is known on the host: no wait.
    n_step = sum(n for _, n in micro)
    loss_sum = torch.zeros((), device=stepper.device)
    for batch, _ in micro:
        loss_sum += stepper(batch, n_step)
    stepper.reduce()
    scaler = stepper.scaler
    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(stepper.params, max_grad_norm)  # a GPU scalar: no wait
    if isinstance(norm, DTensor):  # over a sharded model's gradients: already the global norm, replicated
        norm = norm.full_tensor()
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=not stepper.keeps_grads)
    return loss_sum, n_step, norm


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


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    """(optimizer, schedule) over the trainable (LoRA) parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # the fused CUDA kernel updates every LoRA tensor in one launch, and takes the GradScaler's inf check on
        # the GPU without a host sync
        opt = torch.optim.AdamW(params, fused=params[0].is_cuda, **kw)
    else:
        import bitsandbytes as bnb

        choices = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                   "paged_adamw": bnb.optim.PagedAdamW}
        opt = choices[cfg.optimizer](params, **kw)
    warmup = int(cfg.warmup_ratio * total_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(warmup, total_steps, cfg.schedule))


def _lr_factor(warmup: int, total: int, schedule: str):
    def factor(step):  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def apply_settings(opt, sched, cfg: TrainConfig):
    """This config's lr and weight decay in the optimizer and the schedule, at the schedule's current step (the
    values LambdaLR sets itself; a resumed state brings back the ones it was saved with)."""
    sched.base_lrs = [cfg.lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, lr=cfg.lr * factor(sched.last_epoch))
    sched._last_lr = [group["lr"] for group in opt.param_groups]
