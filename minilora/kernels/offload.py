"""Checkpointed inputs kept in pinned host memory, copied on a side CUDA stream so that no copy stalls compute.

A checkpointed unit (a fast layer's attention or MLP half) keeps only its input for the backward. With
offload that input goes to the host while the next units compute, and comes back one unit ahead of the
backward that needs it:

    forward   unit k: copy its input to pinned host memory on a side stream (after the compute stream has
              produced it); the GPU copy is released once the next unit saves, and its memory is reused only
              after the side stream's copy has read it (record_stream)
    backward  unit k: wait for the event of its input's copy to the GPU, then start the copy of unit k-1's
              input on a second side stream, which runs while unit k recomputes and backpropagates

So at most two inputs are on the GPU at once: the one in use and the next one, copying. Events order the
streams: a copy back waits for the copy out of the same input, and for the compute queued before it (its
buffer may be memory that compute just freed); compute waits for the copy back's event before it reads the
buffer. Copies out and back have a stream each, so a backward prefetch never queues behind forward copies
that are still draining. The last unit's input is never released: the backward starts with it.

On a CPU there are no streams: the same bookkeeping runs with plain copies, so the CPU tests check it.
"""

from __future__ import annotations

import torch

_streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}


class Offload:
    """The saved inputs of one forward pass: `save` in forward order, `load` in the reverse order."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda and device not in _streams:
            _streams[device] = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.out, self.back = _streams.get(device, (None, None))  # copies to the host, and back
        self.host: list[torch.Tensor | None] = []  # per unit, its input in (pinned) host memory
        self.saved: list[torch.cuda.Event | None] = []  # per unit, the event of its copy to the host
        self.gpu: list[torch.Tensor | None] = []  # per unit, its input on the device while there is one
        self.ready: list[torch.cuda.Event | None] = []  # per unit, the event of its copy back to the device

    def save(self, x: torch.Tensor) -> int:
        """Start copying x to the host; returns its slot for `load`."""
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.cuda)
        event = None
        if self.cuda:
            self.out.wait_stream(torch.cuda.current_stream(x.device))  # x has been computed
            with torch.cuda.stream(self.out):
                host.copy_(x, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            x.record_stream(self.out)  # its memory is reused only after this copy has read it
        else:
            host.copy_(x)
        if self.gpu:
            self.gpu[-1] = None  # the previous unit's input: the host copy serves its backward
        self.host.append(host)
        self.saved.append(event)
        self.gpu.append(x)
        self.ready.append(None)
        return len(self.host) - 1

    def load(self, slot: int) -> torch.Tensor:
        """Unit `slot`'s input on the device, once its copy has arrived; starts fetching unit slot-1's."""
        if self.gpu[slot] is None:  # not prefetched (the first backward unit, or a unit out of order)
            self._fetch(slot)
        x, self.gpu[slot] = self.gpu[slot], None
        if self.ready[slot] is not None:
            torch.cuda.current_stream(x.device).wait_event(self.ready[slot])
        self.host[slot] = None  # its pinned block returns to the host allocator once the copies are done
        if slot > 0 and self.host[slot - 1] is not None and self.gpu[slot - 1] is None:
            self._fetch(slot - 1)
        return x

    def _fetch(self, slot: int):
        host = self.host[slot]
        if not self.cuda:
            self.gpu[slot] = host.clone()
            return
        compute = torch.cuda.current_stream()
        x = torch.empty(host.shape, dtype=host.dtype, device=compute.device)
        self.back.wait_stream(compute)  # x's memory may still be read by compute queued before this
        self.back.wait_event(self.saved[slot])  # the host copy is complete
        with torch.cuda.stream(self.back):
            x.copy_(host, non_blocking=True)
            self.ready[slot] = torch.cuda.Event()
            self.ready[slot].record()
        x.record_stream(self.back)
        self.gpu[slot] = x
