"""Checkpointed inputs kept in pinned host memory, copied on a side CUDA stream so that no copy stalls compute.

A checkpointed unit (a fast layer's attention or MLP half) keeps only its input for the backward, and perhaps
a few tensors that spare its recompute some work (attention's output). With offload these go to the host
while the next units compute, and come back one unit ahead of the backward that needs them:

    forward   unit k: copy its tensors to pinned host memory on a side stream (after the compute stream has
              produced them); the GPU copies are released when unit k+2 saves, once the compute stream has
              waited for their copy. Two units later, not one: an attention unit's output is copied from the
              end of its forward, and the next unit would wait for that copy at its start
    backward  unit k: wait for the event of its tensors' copy to the GPU, then start the copy of unit k-1's
              on a second side stream, which runs while unit k recomputes and backpropagates

So two units' tensors are on the GPU besides the input of the unit that runs: in the forward the last two
units', in the backward the ones in use and the next ones, copying. Events order the streams: a copy back waits
for the copy out of the same tensors, and for the compute queued before it (its buffers may be memory that
compute just freed); compute waits for the copy back's event before it reads them. Copies out and back have
a stream each, so a backward prefetch never queues behind forward copies that are still draining. The last two
units' tensors are never released: the backward starts with them.

The host side is one arena per device (`HostArena`): pinned blocks allocated once and handed out again by
every forward from the start, so that a step allocates no pinned memory and its copies go to the same
addresses every time. That, the streams forked from and joined back to the compute stream within the step,
and no `record_stream` (the allocator cannot reuse such memory until a capture ends) let an offloaded step
replay as a CUDA graph (kernels/graphs.py). A step reuses the host blocks of the one before safely: its
copies out wait for its compute, which waited for every copy back of the step before.

On a CPU there are no streams: the same bookkeeping runs with plain copies, so the CPU tests check it.

The lean mode keeps the embedding table in pinned host memory too (host_embedding); `embed` gathers a batch's rows
there and copies them.
"""

from __future__ import annotations

import weakref

import torch

_streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
ALIGN = 256  # bytes: each host tensor starts at a multiple of it
BLOCK = 256 * 2**20  # bytes: the arena grows by blocks of at least this size


class HostArena:
    """Host memory (pinned for a GPU) that the units of one forward take in order; `claim` starts the next
    forward from the first block. Blocks are never freed: the largest step's tensors stay reserved."""

    def __init__(self, pinned: bool):
        self.pinned, self.blocks, self.block, self.offset = pinned, [], 0, 0
        self.user = lambda: None  # a weak reference to the Offload whose tensors the arena holds

    def claim(self, user: Offload) -> bool:
        """Start user's forward from the first block, unless the forward before still waits for its backward
        (two forwards, then one backward): then False, and user takes an arena of its own."""
        last = self.user()
        if last is not None and any(h is not None for h in last.host):
            return False
        self.user, self.block, self.offset = weakref.ref(user), 0, 0
        return True

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised host tensor with like's shape, strides and dtype."""
        span = 1 + sum((n - 1) * st for n, st in zip(like.shape, like.stride())) if like.numel() else 0
        nbytes = (span * like.element_size() + ALIGN - 1) // ALIGN * ALIGN
        while self.block < len(self.blocks) and self.offset + nbytes > self.blocks[self.block].numel():
            self.block, self.offset = self.block + 1, 0
        if self.block == len(self.blocks):
            if self.pinned and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the host arena is too small for this step inside a CUDA graph capture: run "
                                   "the step's shape eagerly once before capturing it")
            self.blocks.append(torch.empty(max(nbytes, BLOCK), dtype=torch.uint8, pin_memory=self.pinned))
        start, self.offset = self.offset, self.offset + nbytes
        raw = self.blocks[self.block][start:start + nbytes].view(like.dtype)
        return raw.as_strided(like.shape, like.stride())


_arenas: dict[torch.device, HostArena] = {}


def release_host_memory():
    """Let go of every device's arena (train() calls it as it ends): its pinned blocks are freed once the last
    step that used them is gone, and the next offloaded forward allocates anew."""
    _arenas.clear()


class Offload:
    """The saved tensors of one forward pass: `save` (and `add`) in forward order, `load` in the reverse order."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda and device not in _streams:
            _streams[device] = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.out, self.back = _streams.get(device, (None, None))  # copies to the host, and back
        self.arena = _arenas.setdefault(device, HostArena(pinned=self.cuda))
        if not self.arena.claim(self):
            self.arena = HostArena(pinned=self.cuda)
        self.host: list[list[torch.Tensor] | None] = []  # per unit, its tensors in (pinned) host memory
        self.saved: list[torch.cuda.Event | None] = []  # per unit, the event of its last copy to the host
        self.gpu: list[list[torch.Tensor] | None] = []  # per unit, its tensors on the device while they are there
        self.ready: list[torch.cuda.Event | None] = []  # per unit, the event of its copy back to the device

    def save(self, x: torch.Tensor) -> int:
        """Start copying a new unit's input x to the host; returns its slot for `add` and `load`."""
        if len(self.gpu) >= 2:  # the tensors of the unit before the previous: the host copies serve its backward
            if self.cuda:
                torch.cuda.current_stream(x.device).wait_event(self.saved[-2])  # their copy has read them
            self.gpu[-2] = None
        self.host.append([])
        self.saved.append(None)
        self.gpu.append([])
        self.ready.append(None)
        self.add(len(self.host) - 1, x)
        return len(self.host) - 1

    def add(self, slot: int, *tensors: torch.Tensor):
        """Start copying more of unit `slot`'s tensors to the host (the newest unit's)."""
        for x in tensors:
            host = self.arena.take(x)  # x's layout
            if self.cuda:
                self.out.wait_stream(torch.cuda.current_stream(x.device))  # x has been computed
                with torch.cuda.stream(self.out):
                    host.copy_(x, non_blocking=True)
                    self.saved[slot] = torch.cuda.Event()
                    self.saved[slot].record()
            else:
                host.copy_(x)
            self.host[slot].append(host)
            self.gpu[slot].append(x)

    def load(self, slot: int) -> list[torch.Tensor]:
        """Unit `slot`'s tensors on the device, in the order saved, once their copy has arrived; starts fetching
        unit slot-1's."""
        if self.gpu[slot] is None:  # not prefetched (the first backward unit, or a unit out of order)
            self._fetch(slot)
        tensors, self.gpu[slot] = self.gpu[slot], None
        if self.cuda:
            compute = torch.cuda.current_stream(tensors[0].device)
            if self.ready[slot] is not None:
                compute.wait_event(self.ready[slot])
            if slot == 0:  # the backward's last load: join the copies out (the last unit's may still run)
                compute.wait_event(self.saved[-1])
        self.host[slot] = None
        if slot > 0 and self.host[slot - 1] is not None and self.gpu[slot - 1] is None:
            self._fetch(slot - 1)
        return tensors

    def _fetch(self, slot: int):
        hosts = self.host[slot]
        if not self.cuda:
            self.gpu[slot] = [h.clone() for h in hosts]
            return
        compute = torch.cuda.current_stream()
        tensors = [torch.empty_strided(h.shape, h.stride(), dtype=h.dtype, device=compute.device) for h in hosts]
        self.back.wait_stream(compute)  # the buffers' memory may still be read by compute queued before this
        self.back.wait_event(self.saved[slot])  # the host copies are complete
        with torch.cuda.stream(self.back):
            for x, h in zip(tensors, hosts):
                x.copy_(h, non_blocking=True)
            self.ready[slot] = torch.cuda.Event()
            self.ready[slot].record()
        self.gpu[slot] = tensors  # allocated on the compute stream, which waits for `ready` before it uses them


def host_embedding(model) -> torch.Tensor | None:
    """The embedding table, when prepare_for_training(offload=True) keeps it in host memory (the rest of the
    model on a GPU); else None."""
    w = model.get_input_embeddings().weight
    return w if w.device.type == "cpu" and model.lm_head.weight.is_cuda else None


def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings of ids (B, T) on lm_head's device. A table in host memory (host_embedding) is read
    there: the ids come to the host (a wait, if they are on the GPU), their rows are gathered into pinned memory and
    copied without another wait."""
    table, device = host_embedding(model), model.lm_head.weight.device
    if table is None:
        return model.get_input_embeddings()(ids.to(device))
    rows = torch.empty((*ids.shape, table.shape[1]), dtype=table.dtype, pin_memory=True)
    torch.index_select(table, 0, ids.reshape(-1).cpu(), out=rows.view(-1, table.shape[1]))
    return rows.to(device, non_blocking=True)
