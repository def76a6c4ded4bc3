"""Choosing the memory plan: the fastest options whose predicted peak (plan.py) fits a budget, for the longest
micro-batch (choose_plan), and for each shorter one the room its smaller activations leave (shape_options)."""

from __future__ import annotations

import dataclasses

from .plan import LOSS_CHUNKS, PlanOptions, Setup, as_config, plan_memory, plan_options, split_fields

# shape_options keeps a shorter micro-batch's predicted peak this share of the budget under the longest one's: on
# an H200, shorter shapes' measured peaks exceeded their predictions by up to 1.0% of the budget more than the
# longest shape's did (benchmarks/NOTES.md)
SHAPE_SLACK = 0.015


def choose_plan(config, batch, seq_len, budget: float, fixed: dict | None = None, setup: Setup | None = None,
                **fields) -> dict:
    """The fastest fast-layer options whose predicted peak fits `budget` bytes: {"options": PlanOptions,
    "plan": plan_memory's result for them, "budget", "fits"}.

    From the leanest (every layer checkpointed, nothing cached; offloaded only if nothing else fits, since
    the copies and the split dequantizations cost some time, and then eager steps only if even that does not
    fit: CUDA graphs keep their own copy of the inputs), memory is spent in the order that saves the
    most time per byte at a guanaco-like step: the recompute keeps its dequantized weights for the backward
    (keep_weights: one dequantization fewer per weight, a layer's weights once), then layers keep their
    weights dequantized for good (cached_layers: no dequantization at all), then layers stop checkpointing
    (no recompute). All this with the smallest loss chunk; then the chunk grows while the peak stays put.
    If even the leanest does not fit, it is returned with "fits": False. fixed: PlanOptions fields decided by
    the caller (e.g. {"checkpointed": 32}), left as they are. setup, fields: the base and adapter (Setup).
    """
    L = as_config(config).num_hidden_layers
    fixed, setup = fixed or {}, split_fields(None, setup, fields)[1]
    change = dataclasses.replace

    def peak(options: PlanOptions) -> int:
        return plan_memory(config, batch, seq_len, plan_options(options, **fixed), setup)["total"]

    opts = PlanOptions(fast=True, checkpointed=L, loss_chunk=LOSS_CHUNKS[-1])
    # leaner and slower: checkpointed inputs and the embedding table in host memory, then eager steps too
    for lean in ({"offload": True}, {"graphs": False}):
        if peak(opts) > budget and not lean.keys() & fixed.keys():
            opts = change(opts, **lean)
    if peak(opts) <= budget:
        if peak(change(opts, keep_weights=True)) <= budget:
            opts = change(opts, keep_weights=True)
        opts = change(opts, cached_layers=max(n for n in range(L + 1) if peak(change(opts, cached_layers=n)) <= budget))
        opts = change(opts, checkpointed=min(n for n in range(L + 1) if peak(change(opts, checkpointed=n)) <= budget))
        # Larger chunks launch fewer, larger GEMMs, but the loss should not become the peak where memory is
        # tight: the largest chunk that fits and leaves the peak where it was (or a peak well inside the budget).
        ceiling = min(budget, max(peak(opts), 0.9 * budget))
        opts = change(opts, loss_chunk=next(c for c in LOSS_CHUNKS if peak(change(opts, loss_chunk=c)) <= ceiling))
    opts = plan_options(opts, **fixed)
    result = plan_memory(config, batch, seq_len, opts, setup)
    return {"options": opts, "plan": result, "budget": budget, "fits": result["total"] <= budget}


def shape_options(config, batch, seq_len, choice: dict, fixed: dict | None = None, setup: Setup | None = None,
                  **fields) -> PlanOptions:
    """The options for a micro-batch of batch x seq_len tokens, under choose_plan's `choice` for the longest: where
    the shorter batch's activations leave room, the recompute keeps its weights, then fewer layers are checkpointed,
    with a predicted peak SHAPE_SLACK of the budget under the longest batch's (and under the budget). What lasts
    the run stays as chosen: cached weights, offload, the embedding's place, the loss chunk, and the CUDA graphs'
    input buffers, which are sized for the longest batch. Options that `fixed` decides stay too."""
    L = as_config(config).num_hidden_layers
    worst, setup = choice["plan"], split_fields(None, setup, fields)[1]
    options = dataclasses.replace(choice["options"], embedding_on_host=worst["inputs"]["embedding_on_host"])
    if not options.fast or {"checkpointed", "gradient_checkpointing", "keep_weights"} & (fixed or {}).keys():
        return options
    ceiling = min(choice["budget"], worst["total"]) - SHAPE_SLACK * choice["budget"]
    inputs = worst["breakdown"].get("graph_inputs", 0)

    def fits(o: PlanOptions) -> bool:
        b = plan_memory(config, batch, seq_len, o, setup)["breakdown"]
        return sum(b.values()) - b.get("graph_inputs", 0) + inputs <= ceiling

    n = options.layers_checkpointed(L)
    if n and not options.keep_weights and fits(dataclasses.replace(options, keep_weights=True)):
        options = dataclasses.replace(options, keep_weights=True)
    fewer = next((k for k in range(n) if fits(dataclasses.replace(options, checkpointed=k))), n)
    return dataclasses.replace(options, checkpointed=fewer)
