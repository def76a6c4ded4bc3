"""Evaluation: the token-weighted mean loss over held-out examples, without grads, shared by the processes of a
process group."""

from __future__ import annotations

import torch

from .config import autocast
from .fsdp import is_sharded
from .loss import causal_lm_loss
from .processes import rank_and_world


@torch.no_grad()
def evaluate(model, examples: list[dict], collate, batch_size: int, precision: str, chunk: int) -> tuple[float, int]:
    """(summed loss, supervised tokens) over `examples`, in micro-batches of batch_size (no grads kept): their
    ratio is the token-weighted mean loss, and sums from several processes add up."""
    was_training = model.training
    model.eval()
    device, total, n = model.lm_head.weight.device, 0.0, 0  # the embedding table may be on the host
    for i in range(0, len(examples), batch_size):
        with autocast(device, precision):
            loss, count = causal_lm_loss(model, collate(examples[i : i + batch_size]), chunk)
        total, n = total + loss.item(), n + count
    model.train(was_training)
    return total, n


def shared_eval_loss(model, examples: list[dict], collate, batch_size: int, precision: str, chunk: int) -> float:
    """evaluate()'s mean loss, the work shared by the processes of a process group (every one must call it):
    each takes every world-th example and the sums are all-reduced. A sharded model's every forward needs every
    process, so each of them evaluates all the examples."""
    rank, world = rank_and_world()
    sharded = is_sharded(model)
    total, n = evaluate(model, examples if sharded else examples[rank::world], collate, batch_size, precision, chunk)
    if world > 1 and not sharded:
        sums = torch.tensor([total, n], dtype=torch.float64, device=model.lm_head.weight.device)
        torch.distributed.all_reduce(sums)
        total, n = sums.tolist()
    return total / n
