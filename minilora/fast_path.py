"""The speed machinery of a run, behind one object (FastPath) built from the memory plan's options: CUDA graphs and
the stream they are captured on, the dense batches graphs need, each batch shape's checkpointing, the embedding
table in host memory, and the offloaded steps' host memory. The plain path (transformers' layers off a GPU) has no
FastPath: train() steps it with step.Stepper and forward.to_device alone."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from .config import PRECISIONS, TrainConfig
from .forward import copy_to, on_host
from .kernels.graphs import PAD_MULTIPLE, GraphedSteps, on_capture_stream
from .kernels.layer import capturable, detach_fast, set_checkpointing
from .kernels.offload import embed, host_embedding, release_host_memory
from .kernels.stream import streamed
from .model import place_embedding
from .plan import PlanOptions
from .template import IGNORE


class FastPath:
    """How a model prepared as `options` say trains fast (kernels/layer.py's fast layers, or any layers on a GPU):

    - `move`: a collated batch to the device, with the embedded rows of a host table, and on CUDA graphs dense
      (every position, 0/1 weights: shapes that depend on the batch's shape alone);
    - `prepare`: each batch shape's checkpointing (shape_plan: (rows, tokens a row) -> its PlanOptions);
    - `graphed`: each batch shape's forward and backward as a replayed CUDA graph (kernels/graphs.py), where
      `graphs` says the run takes them;
    - `running()`: the run's work on the capture stream, and afterwards the fast layers (unless the weights
      stream: then they stay, for evaluation and generation), the offload's pinned host memory and the host table
      let go of (transformers' forward wants none of them).
    pad_multiple: what the collator pads lengths to, so that a few batch shapes recur (None: exact padding).
    """

    def __init__(self, model, cfg: TrainConfig, options: PlanOptions,
                 shape_plan: Callable[[int, int], PlanOptions] | None = None):
        self.model, self.options, self.shape_plan, self.shapes = model, options, shape_plan, {}
        self.device = model.lm_head.weight.device  # not the first parameter's: the embedding may be on the host
        cuda = self.device.type == "cuda"
        self.pad_multiple = PAD_MULTIPLE if options.fast and cuda else None
        self.graphs = bool(options.graphs and cuda and cfg.precision != "fp16" and options.fast
                           and capturable(model, PRECISIONS[cfg.precision]))
        self.max_tokens = cfg.batch_size * math.ceil(cfg.max_len / PAD_MULTIPLE) * PAD_MULTIPLE

    def graphed(self, loss_fn: Callable[[dict], torch.Tensor]) -> GraphedSteps | None:
        """loss_fn's forward and backward per batch shape as a replayed CUDA graph, where this run takes graphs."""
        if not self.graphs:
            return None
        return GraphedSteps([p for p in self.model.parameters() if p.requires_grad], loss_fn,
                            eager_first_per_shape=self.options.offload, max_tokens=self.max_tokens)

    def move(self, batch: dict) -> dict:
        """A collated CPU batch on the device, as forward.to_device moves it; with a host table its rows of it as
        "inputs_embeds"; with graphs "row_weights" and "targets" at every position (0 where unsupervised) instead
        of the supervised positions' "rows"."""
        out = on_host(batch, self.model.lm_head.weight.shape[0])
        if self.graphs:
            following = batch["labels"][:, 1:]  # (B, T - 1): what each position predicts
            del out["rows"]
            out.update(row_weights=(following != IGNORE).float().reshape(-1),
                       targets=following.clamp(min=0).reshape(-1))
        if host_embedding(self.model) is not None:
            out["inputs_embeds"] = embed(self.model, batch["input_ids"])  # gathered on the host, copied
        return copy_to(out, self.device)

    def prepare(self, batch: dict):
        """The checkpointing of the batch's shape, before its forward (eagerly, or at a graph's capture)."""
        if self.shape_plan is not None:
            shape = tuple(batch["input_ids"].shape)
            if shape not in self.shapes:
                o = self.shape_plan(*shape)
                self.shapes[shape] = o.layers_checkpointed(self.model.config.num_hidden_layers), o.keep_weights
            set_checkpointing(self.model, *self.shapes[shape])

    @contextlib.contextmanager
    def running(self):
        """The run's work. On a GPU all of it (eager steps, evaluation, samples) runs on the stream that CUDA graphs
        are captured on: cuBLAS keeps a workspace per (thread, stream), and one stream keeps the two the plan counts."""
        try:
            with on_capture_stream() if self.device.type == "cuda" else contextlib.nullcontext():
                yield self
        finally:
            if not streamed(self.model.model.layers[0]):  # streamed weights are read through the fast layers alone
                detach_fast(self.model)  # the fast layers' weight caches go with them
            release_host_memory()  # the offloaded steps' pinned host memory
            place_embedding(self.model)  # back beside lm_head, where transformers' forward wants it


def fast_path(model, cfg: TrainConfig, options: PlanOptions,
              shape_plan: Callable[[int, int], PlanOptions] | None = None) -> FastPath | None:
    """The FastPath of a model prepared as `options` say, or None for the plain path: transformers' layers with
    the model on the CPU."""
    if not options.fast and model.lm_head.weight.device.type != "cuda":
        return None
    return FastPath(model, cfg, options, shape_plan)
