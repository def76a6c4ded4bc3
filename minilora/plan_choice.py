"""Choosing the memory plan: the fastest options whose predicted peak (plan.py) fits a budget, for the longest
micro-batch (choose_plan), for each shorter one the room its smaller activations leave (shape_options), and a
run's plan from its model and config (plan_run)."""

from __future__ import annotations

import dataclasses
import functools

import torch

from .adapter import model_lora
from .config import PRECISIONS
from .kernels.graphs import PAD_MULTIPLE
from .kernels.layer import unsupported
from .kernels.lora4bit import is_4bit
from .kernels.stream import SLOTS, host_link_gbps
from .lora import LoRALinear
from .plan import GiB, LOSS_CHUNKS, PlanOptions, Setup, as_config, plan_memory, plan_options, split_fields

# shape_options keeps a shorter micro-batch's predicted peak this share of the budget under the longest one's: on
# an H200, shorter shapes' measured peaks exceeded their predictions by up to 1.0% of the budget more than the
# longest shape's did (benchmarks/NOTES.md)
SHAPE_SLACK = 0.015


def choose_plan(config, batch, seq_len, budget: float, fixed: dict | None = None, setup: Setup | None = None,
                fast: bool = True, **fields) -> dict:
    """The fastest options whose predicted peak fits `budget` bytes: {"options": PlanOptions, "plan":
    plan_memory's result for them, "budget", "fits"}. fast=False: for transformers' layers, which choose only
    the checkpointed layers, offload and the loss chunk.

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

    opts = PlanOptions(fast=fast, checkpointed=L, loss_chunk=LOSS_CHUNKS[-1])
    # leaner and slower: checkpointed inputs and the embedding table in host memory, then the 4-bit weights too
    # (streamed; every layer stays checkpointed, none cached), then eager steps
    def helps(lean: dict) -> bool:  # a step the caller leaves open, which lowers the peak
        stream_closed = "stream" in lean and fixed.keys() & {"gradient_checkpointing", "checkpointed", "cached_layers"}
        return not (lean.keys() & fixed.keys() or stream_closed) and peak(change(opts, **lean)) < peak(opts)

    for lean in ({"offload": True}, {"stream": True}, {"graphs": False}) if fast else ({"offload": True},):
        if peak(opts) > budget and helps(lean):
            opts = change(opts, **lean)
    # streamed weights may leave room for the activations on the device: then they stay (the host link carries
    # the weights alone)
    if opts.stream and "offload" not in fixed and peak(change(opts, offload=False)) <= budget:
        opts = change(opts, offload=False)
    if peak(opts) <= budget:
        if fast and peak(change(opts, keep_weights=True)) <= budget:
            opts = change(opts, keep_weights=True)
        if fast and not opts.stream:
            opts = change(opts, cached_layers=max(n for n in range(L + 1)
                                                  if peak(change(opts, cached_layers=n)) <= budget))
        if not opts.stream:
            opts = change(opts, checkpointed=min(n for n in range(L + 1)
                                                 if peak(change(opts, checkpointed=n)) <= budget))
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
    if not options.fast or options.stream or {"checkpointed", "gradient_checkpointing", "keep_weights"} & (
            fixed or {}).keys():  # streamed layers are all checkpointed: their backward is where their copies go
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


def plan_run(model, cfg) -> tuple[PlanOptions, str, functools.partial | None]:
    """The decoder's options for a run of `cfg` (a TrainConfig) on `model` (with its LoRA), a line that says them,
    and the rule for shorter micro-batches (rows, tokens a row) -> options, or None without one.

    The fast layers run where they can (kernels.layer.unsupported decides), else transformers' layers, and the
    line says which and why. On a GPU the options come from the memory plan for the budget (memory_budget_gib, or
    what the card has free plus what this process holds already), for the worst micro-batch: batch_size x max_len
    tokens; with fast layers a shorter one checkpoints fewer layers where the budget has room for its activations
    (shape_options). Off a GPU, sharded (fsdp), or for an architecture whose sizes the plan cannot read, every
    layer is checkpointed (unless gradient_checkpointing=False) and nothing is cached or offloaded.
    """
    L, device = model.config.num_hidden_layers, next(model.parameters()).device
    why = "fast=False" if not cfg.fast else "fsdp=True" if cfg.fsdp else unsupported(model, cfg.max_len)
    path = f"transformers' decoder layers ({why})" if why else "fast layers"
    options = plan_options(PlanOptions(fast=not why, loss_chunk=LOSS_CHUNKS[0]), **cfg.fixed_plan())
    no_plan = ("off a GPU" if device.type != "cuda" else "sharded" if cfg.fsdp
               else None if plannable(model) else "for this architecture")
    if no_plan:
        return options, f"{path}, {options.layers_checkpointed(L)}/{L} checkpointed (no memory plan {no_plan})", None
    budget, source = memory_budget(cfg, device)
    setup = Setup(lora=model_lora(model),
                  quant="nf4" if any(is_4bit(m) for m in model.modules()) else None,
                  compute_dtype=PRECISIONS[cfg.precision], optimizer=cfg.optimizer,
                  data_parallel=torch.distributed.is_initialized())
    choice = choose_plan(model.config, cfg.batch_size, cfg.max_len, budget, fixed=cfg.fixed_plan(), setup=setup,
                         fast=not why)
    o, plan, n = choice["options"], choice["plan"], choice["options"].layers_checkpointed(L)
    shape_plan = functools.partial(shape_options, model.config, choice=choice, fixed=cfg.fixed_plan(), setup=setup)
    shortest = shape_plan(cfg.batch_size, PAD_MULTIPLE).layers_checkpointed(L)
    detail = (" (their recompute keeps its weights)" if o.keep_weights and n else "") + (
        f", {shortest} at {cfg.batch_size} x {PAD_MULTIPLE} tokens" if shortest < n else "") + (
        f", their inputs{' and the embedding table' if plan['inputs']['embedding_on_host'] else ''} in "
        f"host memory ({(plan['cpu'] - plan['streamed_host']) / GiB:.2f} GiB pinned)" if o.offload and n else "")
    if o.stream:  # the host link's floor: what a step copies, at the speed a copy takes now
        per_step, gbps = plan["streamed_per_step"], host_link_gbps(device)
        detail += (f"; every layer's 4-bit weights streamed from host memory ({plan['streamed_host'] / GiB:.1f} GiB "
                   f"pinned, {SLOTS} layers at a time on the GPU): {per_step / 1e9:.1f} GB a step over a "
                   f"{gbps:.0f} GB/s host link, at least {per_step / 1e9 / gbps:.2f} s a step, and "
                   f"{plan['streamed_host'] / 1e9 / gbps:.2f} s a sampled token")
    cached = f", {o.cached_layers}/{L} layers' weights kept dequantized" if o.fast else ""
    line = (f"memory plan for a budget of {budget / GiB:.1f} GiB ({source}): {path}{cached}, {n}/{L} "
            f"checkpointed{detail}, loss chunk {o.loss_chunk}; predicted peak {plan['total'] / GiB:.2f} GiB at "
            f"{cfg.batch_size} x {cfg.max_len} tokens")
    if o.fast and not o.graphs and cfg.cuda_graphs:
        line += " (eager steps: the CUDA graphs' copy of the inputs would not fit)"
    if not choice["fits"]:
        line += "; that exceeds the budget: lower batch_size or max_len"
    return o, line, shape_plan if o.fast else None


def memory_budget(cfg, device) -> tuple[float, str]:
    """(bytes, where they come from): cfg.memory_budget_gib, or what the GPU has free plus what this process
    holds already (nothing, before the model loads)."""
    if cfg.memory_budget_gib:
        return cfg.memory_budget_gib * GiB, "memory_budget_gib"
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    return free, f"free on {torch.cuda.get_device_name(device)}"


def plannable(model) -> bool:
    """Whether plan_memory can read the model's sizes: a config with LLaMA's size fields, decoder layers with its
    seven linears, LoRA on them or not (Qwen3 and Gemma qualify; their norms and biases are within the plan's
    margin)."""
    c = model.config
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, LoRALinear)) or is_4bit(m)}
    return all(hasattr(c, f) for f in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")) \
        and {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
