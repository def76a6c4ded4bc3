"""The stream of micro-batches a run trains on (Feed): the examples batched (or packed) in an order that is a pure
function of the seed and the position, shared out to the processes of a process group, collated and moved to the
device ahead of their step."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator

from .data import batches, packs
from .loss import supervised_count
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
    move: Callable  # a CPU batch -> one on the device, ready for the loss (forward.to_device)
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
