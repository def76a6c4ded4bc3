"""The 4-bit weights of the decoder layers in pinned host memory, each layer's copied to the GPU a few layers ahead of
its use on a side stream: a model whose weights do not fit the card trains on it (PlanOptions.stream).

What streams is what grows with the weights: each 4-bit linear's packed NF4 codes and its block scales (absmax, and
with double quantization the fp32 scales of those). The 16-value code tables and the offset stay on the device. The
device holds SLOTS layers' worth of buffers, allocated once: layer i is copied into slot i % SLOTS, so its
tensors are at the same addresses in every step, as a CUDA graph's replay needs. While a layer is in its slot, its
parameters point there; once another layer takes the slot, they point back to their host copies.

    forward   use(i, +1) at layer i: the first layer copies layers 0..AHEAD afresh (whatever the slots held before:
              evaluation, samples or a replayed graph find the state they expect); each layer waits for its copy
              and starts copying layer i + AHEAD, into the slot of layer i - 1, whose compute is queued by then
    backward  use(i, -1) at layer i's first checkpointed unit: the forward left the last SLOTS layers in their
              slots; each layer starts copying layer i - AHEAD, into the slot of layer i + 1

Copies run on one side stream, forked from the compute stream (a copy waits for the compute queued before it, which
includes the last reader of its slot) and joined back by an event per slot that compute waits on before the
layer's first read: within one step, so that a captured step forks and joins inside its capture.

transformers' own forward of the model (its generate, a user's `model(ids)`) reads the layers through the same
window, under torch.no_grad() only: a backward through transformers' layers would read weights that are out by then.

A read of a layer that is out fails loudly: on a GPU its parameters are pinned host tensors (a device mismatch); on
a CPU, where the same bookkeeping runs with plain copies, the block scales of a layer that is out are NaN, so that
such a read makes the loss NaN (the CPU tests check it).
"""

from __future__ import annotations

import contextlib

import torch

from .lora4bit import is_4bit

AHEAD = 2  # layers copied ahead of the one in use
SLOTS = AHEAD + 1  # layers on the device at once


def streamed_tensors(weight) -> list[tuple[object, str]]:
    """(owner, attribute) of the tensors of a 4-bit weight (a Params4bit) that stream: its codes and block scales."""
    qs = weight.quant_state
    return [(weight, "data"), (qs, "absmax")] + ([(qs.state2, "absmax")] if qs.nested else [])


def parked(module) -> bool:
    """Whether `module` is a 4-bit linear whose codes wait in host memory, away from its code table's device (loaded
    by host_load.load_streamed, or streamed and out of its window on a GPU)."""
    return is_4bit(module) and module.weight.device != module.weight.quant_state.code.device


@contextlib.contextmanager
def fetched(module):
    """A parked 4-bit linear's codes and block scales on its code table's device for the block, then parked again:
    for a one-off read of its weight (DoRA's first magnitudes)."""
    if not parked(module):
        yield
        return
    refs = streamed_tensors(module.weight)
    host = [getattr(o, n) for o, n in refs]
    for (owner, name), t in zip(refs, host):
        setattr(owner, name, t.to(module.weight.quant_state.code.device))
    try:
        yield
    finally:
        for (owner, name), t in zip(refs, host):
            setattr(owner, name, t)


class WeightStream:
    """The streamed 4-bit weights of a model's decoder layers: `layers` holds each layer's 4-bit weights (Params4bit,
    on `device`), which move to host memory here."""

    def __init__(self, layers: list[list[torch.nn.Parameter]], device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.refs = [[ref for w in weights for ref in streamed_tensors(w)] for weights in layers]
        shapes = {tuple((getattr(o, n).shape, getattr(o, n).dtype) for o, n in refs) for refs in self.refs}
        if len(shapes) != 1:
            raise ValueError("streamed layers must hold 4-bit weights of the same shapes")
        like = [getattr(o, n) for o, n in self.refs[0]]
        self.slots = [[torch.empty_like(t, device=device) for t in like] for _ in range(min(SLOTS, len(layers)))]
        self.holds = [None] * len(self.slots)  # the layer each slot holds
        self.ready = [None] * len(self.slots)  # its copy's event, until compute has waited for it
        self.copies = torch.cuda.Stream(device) if self.cuda else None
        self.hooks = []  # stream_weights' hooks on the decoder layers
        # per layer: its tensors in host memory, and what its parameters point to while it is out; a layer at a
        # time, so that its tensors of before are freed before the next layer's copies are made
        self.host, self.away = [], []
        for i, refs in enumerate(self.refs):
            self.host.append([getattr(o, n).cpu().pin_memory() if self.cuda else getattr(o, n).clone()
                              for o, n in refs])
            self.away.append(self.host[i] if self.cuda else [torch.full_like(t, float("nan"))
                                                              if t.is_floating_point() else t for t in self.host[i]])
            self._point(i, self.away[i])

    def use(self, i: int, direction: int):
        """Layer i is about to run: its weights in place once its copy has arrived (compute waits for it), and the
        copies of the layers AHEAD further in `direction` (+1: the forward, -1: the backward) started."""
        if i == 0 and direction > 0:  # a forward begins: the first layers afresh
            for j in range(min(SLOTS, len(self.refs))):
                self._fetch(j)
        elif self.holds[i % len(self.slots)] != i:  # not prefetched (a pass that stopped early)
            self._fetch(i)
        self._wait(i % len(self.slots))
        j = i + AHEAD * direction
        if len(self.refs) > len(self.slots) and 0 <= j < len(self.refs) and self.holds[j % len(self.slots)] != j:
            self._fetch(j)

    def _fetch(self, j: int):
        s = j % len(self.slots)
        if self.holds[s] is not None:
            self._point(self.holds[s], self.away[self.holds[s]])
        if self.cuda:
            self.copies.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last reader is queued
            with torch.cuda.stream(self.copies):
                for slot, host in zip(self.slots[s], self.host[j]):
                    slot.copy_(host, non_blocking=True)
                self.ready[s] = torch.cuda.Event()
                self.ready[s].record()
        else:
            for slot, host in zip(self.slots[s], self.host[j]):
                slot.copy_(host)
        self.holds[s] = j
        self._point(j, self.slots[s])

    def _wait(self, s: int):
        if self.ready[s] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])
            self.ready[s] = None

    def _point(self, i: int, tensors: list[torch.Tensor]):
        for (owner, name), t in zip(self.refs[i], tensors):
            setattr(owner, name, t)

    def restore(self):
        """Every layer's weights back on the device, in tensors of their own (the model as it was before)."""
        for i in range(len(self.refs)):
            self._point(i, [t.to(self.device) for t in self.host[i]])
        self.holds = [None] * len(self.slots)


_STREAM = "_minilora_stream"  # where a decoder layer holds (its model's WeightStream, its index)


def stream_weights(layers, device: torch.device) -> WeightStream:
    """Move the 4-bit weights of `layers` (decoder layers whose linears are all 4-bit) to host memory, streamed back
    as they run; a second call on the same layers returns the stream they have."""
    if _STREAM in layers[0].__dict__:
        return layers[0].__dict__[_STREAM][0]
    stream = WeightStream([[m.weight for m in layer.modules() if is_4bit(m)] for layer in layers], device)
    for i, layer in enumerate(layers):
        layer.__dict__[_STREAM] = stream, i
        stream.hooks.append(layer.register_forward_pre_hook(_own_forward))
    return stream


def _own_forward(layer, args):
    """Before transformers' forward of a streamed layer (minilora's fast layers call no decoder layer itself)."""
    if torch.is_grad_enabled():
        raise RuntimeError("the model's weights stream from host memory: its own forward runs under torch.no_grad() "
                           "only (evaluation, generation); train through ml.train or ml.causal_lm_loss, or load "
                           "the weights back with prepare_for_training(model, stream=False)")
    stream, i = layer.__dict__[_STREAM]
    stream.use(i, +1)


def unstream(layers):
    """The layers' 4-bit weights on the device their code tables are on, in tensors of their own: streamed ones
    back from their stream, ones loaded into host memory (host_load.load_streamed) copied there."""
    if _STREAM in layers[0].__dict__:
        stream = layers[0].__dict__[_STREAM][0]
        stream.restore()
        for hook in stream.hooks:
            hook.remove()
        for layer in layers:
            del layer.__dict__[_STREAM]
    for m in (m for layer in layers for m in layer.modules() if parked(m)):
        for owner, name in streamed_tensors(m.weight):
            setattr(owner, name, getattr(owner, name).to(m.weight.quant_state.code.device))


def streamed(layer) -> tuple[WeightStream, int] | None:
    """(the stream, the layer's index in it) for a layer whose weights stream, else None."""
    return layer.__dict__.get(_STREAM)


def host_link_gbps(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """GB/s of a copy from pinned host memory to `device` (a GPU), timed once after a warm-up copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return nbytes / start.elapsed_time(end) / 1e6  # bytes per ms -> GB/s
