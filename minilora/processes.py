"""The torch.distributed process group a run may train in: whether there is one, this process's rank and the
number of processes."""

from __future__ import annotations

import torch.distributed as dist


def in_process_group() -> bool:
    """Whether this process trains in a torch.distributed process group (of any size, one included)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without a torch.distributed process group."""
    return (dist.get_rank(), dist.get_world_size()) if in_process_group() else (0, 1)
