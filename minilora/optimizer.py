"""The optimizer step: the micro-batches' gradients, summed over processes, unscaled, clipped and applied by AdamW
(torch's, or bitsandbytes' 8-bit or paged one), and the learning-rate schedule (linear warmup, then cosine or
constant)."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from .config import TrainConfig
from .step import Stepper


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
