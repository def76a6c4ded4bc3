"""A micro-batch's forward and backward as a CUDA graph, captured once per batch shape and replayed.

Eager PyTorch pays some microseconds of host time per kernel launch; the fast layer's step launches about
two thousand kernels, and at guanaco's ~1,600 tokens a step the GPU finishes them sooner than the host can
issue them. A replayed graph issues them all in one call. What that needs:
- fixed shapes: the batches are padded to a multiple of PAD_MULTIPLE tokens, so a few shapes recur (a packed
  micro-batch has one shape, and a few counts of examples); the loss reads every position with 0/1 weights
  (fast_path.FastPath.move) instead of a variable number of rows;
- fixed addresses: inputs are copied into the graph's own tensors (views of one buffer per input, shared by
  every graph: the embedded rows of a host table take B x T x H each); the LoRA gradients are allocated before
  the first capture and accumulated into by every replay (the loop zeroes them, never frees them); the
  1 / n_tokens factor of the backward is a tensor filled per call;
- nothing that waits for the host, allocates for good, or frees a graph during a capture (the cycle collector
  waits, see `capture`): the first micro-batch runs eagerly, which also fills the layers' weight caches
  (kernels/lora4bit.Projection) outside any graph; with `eager_first_per_shape` (offloaded units) each shape's
  first micro-batch does, which sizes the pinned host arena the offloaded tensors go to (kernels/offload.py), so
  that a capture takes only memory already there;
- an embedding table on the host: its rows come gathered and copied as "inputs_embeds", a static input too.
The eager micro-batches run on the capture stream, so that they and the captures share cuBLAS's workspaces. All
graphs share one memory pool: they never run at the same time, and only their loss outputs outlive a replay.
Dropout masks come from the CUDA generator's graph-safe offsets, fresh at each replay; a checkpointed
unit's recompute rewinds the generator to its forward's offset (torch allows that inside a capture), so it
draws the forward's masks again.
Used by train() with fast layers whose weights are kept dequantized or dequantized by the Triton NF4 kernel
(no bitsandbytes call inside a graph), checkpointed or not, offloaded or not: an offloaded unit's copies run on
side streams that fork from the captured stream and join it again within the step.
"""

from __future__ import annotations

import contextlib
import gc
import math

import torch

PAD_MULTIPLE = 64  # tokens; guanaco's batches then take ~16 shapes and ~7% more tokens than exact padding


class GraphedSteps:
    """forward + backward of `loss_fn` (a dense batch -> its summed loss) per batch shape, through one CUDA graph
    each. params: the trainable parameters, whose gradients every replay accumulates into."""

    def __init__(self, params: list[torch.Tensor], loss_fn, eager_first_per_shape: bool = False,
                 max_tokens: int | None = None):
        self.params, self.loss_fn, self.eager_first_per_shape = params, loss_fn, eager_first_per_shape
        self.max_tokens = max_tokens  # B x T of the largest batch to come, if known: sizes the shared inputs
        self.graphs = {}  # the batch's shapes and constants -> (static inputs, constants[, graph, static loss])
        self.pool = torch.cuda.graph_pool_handle()
        self.eager = set()  # the shapes whose first micro-batch ran eagerly (one in all, or each)
        self.inputs = {}  # input name -> the buffer that every graph's input of that name is a view of

    def __call__(self, batch: dict, scale: float) -> torch.Tensor:
        """Add the gradient of scale * loss_sum to the LoRA .grad and return loss_sum: a tensor that the next
        call overwrites. batch: dense, as FastPath.move makes it, right-padded (no attention_mask) or packed. Its
        tensors are the graph's inputs; its other values but n_tokens are constants of the graph. The batch is
        consumed (emptied once read), so that its tensors are not held through the step beside the graph's."""
        key = tuple((name, tuple(x.shape) if torch.is_tensor(x) else x) for name, x in batch.items()
                    if name != "n_tokens")
        if not self.eager or (self.eager_first_per_shape and key not in self.eager):  # lazy initialisation, caches
            self.eager.add(key)
            with on_capture_stream():
                loss = self.loss_fn(batch)
                batch.clear()
                (loss * scale).backward()
            return loss.detach()
        if key not in self.graphs:
            self.graphs[key] = self._static(batch)
        static, constants = self.graphs[key][:2]
        for name, tensor in static.items():
            tensor.fill_(scale) if name == "scale" else tensor.copy_(batch[name])
        batch.clear()
        if len(self.graphs[key]) == 2:  # captured after the inputs are in place and the batch's copies are gone
            self.graphs[key] = (static, constants, *self._capture(static, constants))
        _, _, graph, loss = self.graphs[key]
        graph.replay()
        return loss

    def _static(self, batch: dict) -> tuple[dict, dict]:
        """(the graph's input tensors, its constants) for batches shaped like this one."""
        tokens = batch["input_ids"].numel()
        static = {name: self._input(name, x, tokens) for name, x in batch.items() if torch.is_tensor(x)}
        static["scale"] = torch.ones((), device=batch["input_ids"].device)
        return static, {name: x for name, x in batch.items() if not torch.is_tensor(x)}

    def _capture(self, static: dict, constants: dict) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # fixed addresses that every replay accumulates into
        graph = torch.cuda.CUDAGraph()
        dtype = torch.get_autocast_dtype("cuda")
        with capture(graph, pool=self.pool), torch.autocast("cuda", dtype=dtype, cache_enabled=False,
                                                            enabled=torch.is_autocast_enabled("cuda")):
            loss = self.loss_fn({**static, **constants, "n_tokens": None})
            (loss * static["scale"]).backward()
        return graph, loss.detach()

    def _input(self, name: str, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """A tensor shaped like x (of a batch of `tokens` tokens) for a graph's input `name`: a view of the one
        buffer that every graph's `name` shares, since graphs never run at once. It is sized for max_tokens; a
        batch that outgrows it gets a larger one, which later captures share."""
        buf = self.inputs.get(name)
        if buf is None or buf.numel() < x.numel():
            n = max(x.numel(), math.ceil(x.numel() * (self.max_tokens or 0) / tokens))
            buf = self.inputs[name] = torch.empty(n, dtype=x.dtype, device=x.device)
        return buf[:x.numel()].view(x.shape)


_STREAMS: dict[int, torch.cuda.Stream] = {}


def _stream() -> torch.cuda.Stream:
    """The one stream (per device) that every capture and every eager warm-up before one runs on. cuBLAS keeps a
    workspace for each (thread, stream) it runs on, 32 MiB on a Hopper card: one stream for both keeps two (the
    forward's thread and the autograd thread), the two that plan.CUBLAS_WORKSPACES counts, not four."""
    device = torch.cuda.current_device()
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


@contextlib.contextmanager
def on_capture_stream():
    """Work on the capture stream, after what the current stream has queued and before what it queues next: the
    eager warm-ups before a capture, decoding, and all of train(), so that they and the captures share cuBLAS's
    workspaces."""
    stream, current = _stream(), torch.cuda.current_stream()
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool=None):
    """torch.cuda.graph on the capture stream, with Python's cycle collector paused: a collection inside the
    capture could free what earlier runs left in cycles (a graph, pinned host memory), and freeing those calls
    CUDA in ways a capture forbids, which invalidates it and every later capture in the process."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=_stream()):
            yield
    finally:
        if enabled:
            gc.enable()
