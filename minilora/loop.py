"""train(): set-up, then the loop, read top to bottom, from a batch of token ids to an optimizer update."""

from __future__ import annotations

import dataclasses
import math
import signal
import threading

import torch
import torch.distributed as dist

from .adapter import lora_settings, save_adapter
from .checkpoint import check_resume, resume, rng_state, run_shape, save_checkpoint
from .config import PRECISIONS, TrainConfig, check, default_precision
from .data import Collator
from .generate import evaluate, samples
from .kernels.graphs import PAD_MULTIPLE
from .kernels.layer import detach_fast, host_embedding, unsupported
from .kernels.lora4bit import is_4bit
from .lora import add_lora, lora_layers, lora_state_dict
from .loss import supervised_count, to_device
from .metrics import Metrics
from .model import place_embedding, prepare_for_training
from .plan import LOSS_CHUNKS, GiB, PlanOptions, Setup, choose_plan, plan_options
from .rundir import claim
from .step import Feed, Stepper, optimizer_step
from .template import DataStats, encode_rows


def train(model, tokenizer, train_rows, cfg: TrainConfig, eval_rows=None) -> list[dict]:
    """Fine-tune the model's LoRA weights on `train_rows`; return the history (the lines of metrics.jsonl).

    Rows are guanaco-format strings, {"text": ...} or {"messages": [...]} dicts, in a list or a Dataset, or
    the (examples, stats) that encode_rows returned, taken as they are. eval_rows likewise. The config, the
    data and the output directory are checked before the model is touched. A model without LoRA layers gets
    them from cfg. The final adapter lands in cfg.output_dir/adapter/.

    With a torch.distributed process group (torchrun), every process trains data-parallel on its own device
    through DDP: batch_size is per process, and the loss is normalised by the supervised tokens of the whole
    global step, so N processes train the adapter that one would at N x the batch. Process 0 alone logs,
    evaluates, samples and writes files.
    """
    check(cfg)  # again: the fields may have changed since the config was made
    device = next(model.parameters()).device
    rank, world = _process()
    cfg = dataclasses.replace(cfg, precision=cfg.precision or default_precision(device))
    examples, stats, evals = _setup_data(model, tokenizer, train_rows, eval_rows, cfg)
    run = claim(cfg.output_dir, cfg.resume, cfg.overwrite, rank)  # this run's directory, or refused
    try:
        shape = run_shape(cfg, examples, getattr(model, "name_or_path", None), world, lora_settings(model))
        changed = check_resume(run, shape, cfg)  # a resumed checkpoint must come from a run of this shape
        options, plan_line = _setup_model(model, cfg, world)
        graphs = cfg.cuda_graphs and options.graphs(model.config.num_hidden_layers) and device.type == "cuda" \
            and cfg.precision != "fp16" and not cfg.pack and world == 1  # graphs need fixed shapes, no scaler
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # fp16: small grads survive
        stepper = Stepper(model, options.loss_chunk, cfg.precision, "graphs" if graphs else "ddp" if world > 1
                          else "eager", scaler)
        feed = _setup_feed(model, tokenizer, examples, cfg, options, dense=graphs)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * feed.per_epoch / cfg.grad_accum))
        opt, sched = _setup_optimizer(model, cfg, total_steps)
        step = resume(model, run, opt, sched, scaler, rank, world)
        _apply_settings(opt, sched, cfg)  # a resumed optimizer and schedule bring back their saved lr and decay
        log = Metrics(cfg, run, step, total_steps, world, overflow_skips=scaler.is_enabled())
        plan_line += f"; CUDA graphs {'on' if graphs else 'off'}"
        log.say(plan_line)
        if step and changed:
            log.say(f"resumed from {run.resume_from} at step {step}, with changed settings applied from here on: "
                    + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
            log.log({"step": step, "resumed_from": run.resume_from, "changed": changed})
        stream = feed.stream(step * cfg.grad_accum)
        if not step:
            log.log({"step": 0, **stats.record(), "memory_plan": plan_line})
            if evals and rank == 0:  # the baseline the eval curve is read against
                _evaluate(stepper, evals, feed, cfg, log, step)
            _sample(model, tokenizer, cfg, log, step)
        record = {"shape": shape, "config": dataclasses.asdict(cfg)}  # each checkpoint's run.json
        model.train()
        stop = _StopRequest(world == 1)
        log.restart_clock()
        try:
            while step < total_steps:
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                step += 1
                log.add(step, *optimizer_step(stepper, micro, opt, sched, cfg.max_grad_norm))
                due_log = step % cfg.log_every == 0 or step == total_steps
                due_eval = evals and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0))
                due_sample = cfg.sample_every and step % cfg.sample_every == 0 and step != total_steps
                due_save = step == total_steps or (cfg.save_every and step % cfg.save_every == 0) or stop.asked
                if not (due_log or due_eval or due_sample or due_save):
                    continue
                log.drain()  # the one wait for the GPU, before anything that reads or saves these steps
                if due_log:
                    log.log_interval(step, step * cfg.grad_accum / feed.per_epoch, sched.get_last_lr()[0], device)
                if due_eval and rank == 0:
                    _evaluate(stepper, evals, feed, cfg, log, step)
                if due_sample:
                    _sample(model, tokenizer, cfg, log, step)
                if due_save:
                    save_checkpoint(model, run, step, (opt, sched, scaler, rng_state()), record, cfg.keep_last,
                                    rank, world)
                if stop.asked and step < total_steps:  # at the last step the run ends as it would anyway
                    raise Interrupted(f"interrupted after step {step}: saved {run.output_dir}/checkpoint-{step}; "
                                      "resume it with resume='latest', bit for bit as if never stopped")
                log.restart_clock()
            stop.close()
            _sample(model, tokenizer, cfg, log, step)
        finally:
            stop.close()
            log.close()
            detach_fast(model)  # the fast layers' weight caches go with them; generation needs neither
            place_embedding(model)  # back beside lm_head, where generation and transformers' forward want it
        if rank == 0:
            save_adapter(model, f"{cfg.output_dir}/adapter")
            log.plot()
        if world > 1:
            dist.barrier()  # the adapter is there for every process when train() returns
        return log.history
    finally:
        run.release()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped train() at a step boundary, after saving a checkpoint there; the message names it."""


# ---------------------------------------------------------------- set-up

def _process() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without a torch.distributed process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _setup_data(model, tokenizer, train_rows, eval_rows, cfg: TrainConfig):
    """(examples, stats, eval examples or None), checked before the model is touched."""
    examples, stats = _encoded(train_rows, tokenizer, cfg)
    evals = _encoded(eval_rows, tokenizer, cfg)[0] if eval_rows is not None else None
    if cfg.precision == "fp16" and any(p.dtype != torch.float32 for p in lora_state_dict(model).values()):
        raise ValueError("fp16 needs fp32 LoRA weights; add_lora(..., dtype=torch.float32) or use precision='bf16'")
    if cfg.progress and _process()[0] == 0:
        print(stats.summary(cfg.max_len))  # before the progress bar exists, so that it is not on the bar's line
    return examples, stats, evals


def _encoded(rows, tokenizer, cfg: TrainConfig) -> tuple[list[dict], DataStats]:
    """(examples, stats): encode_rows' result as it is, or rows encoded under cfg."""
    if not (isinstance(rows, tuple) and len(rows) == 2 and isinstance(rows[1], DataStats)):
        return encode_rows(rows, tokenizer, cfg.max_len, cfg.skip_malformed)
    longest = max(len(ex["input_ids"]) for ex in rows[0])
    if longest > cfg.max_len:
        raise ValueError(f"an encoded example has {longest} tokens, more than max_len={cfg.max_len}; "
                         "encode_rows with the max_len of the TrainConfig")
    empty = [i for i, ex in enumerate(rows[0]) if not supervised_count(ex["labels"])]
    if empty:  # a step of such examples would divide a zero loss by zero supervised tokens
        raise ValueError(f"encoded examples {empty[:5]} supervise no token (every label is -100 after the "
                         "first); drop them, as encode_rows does")
    return rows


def _setup_model(model, cfg: TrainConfig, world: int) -> tuple[PlanOptions, str]:
    """LoRA from cfg (when the model has none), then the decoder prepared as the memory plan says; returns the
    plan's options and a line that says what and why."""
    torch.manual_seed(cfg.seed)
    if not lora_layers(model):
        add_lora(model, cfg.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)  # fp32 master weights
    options, line = _plan(model, cfg, world)
    prepare_for_training(model, options)
    if world > 1:
        torch.manual_seed(cfg.seed + 1 + _process()[0])  # the same LoRA init everywhere, a dropout stream each
    return options, line + (f"; data-parallel over {world} processes" if world > 1 else "")


def _plan(model, cfg: TrainConfig, world: int) -> tuple[PlanOptions, str]:
    """The decoder's options for this run. On a GPU they come from the memory plan for the budget
    (memory_budget_gib, or what the card has free plus what this process holds already), for the worst
    micro-batch: batch_size x max_len tokens. Elsewhere, and with fast off, every layer is checkpointed (unless
    gradient_checkpointing=False) and nothing is cached or offloaded. DDP needs every parameter on one device:
    the embedding table stays there with several processes."""
    L, device = model.config.num_hidden_layers, next(model.parameters()).device
    host = None if world == 1 else False
    options = plan_options(PlanOptions(fast=False, loss_chunk=LOSS_CHUNKS[0], embedding_on_host=host),
                           **cfg.fixed_plan())
    ckpt = f"{options.layers_checkpointed(L)}/{L}"
    why = "fast=False" if not cfg.fast else unsupported(model.config)
    if why:
        return options, f"transformers' decoder layers ({why}), {ckpt} checkpointed"
    if device.type != "cuda":
        return dataclasses.replace(options, fast=True), f"fast layers, {ckpt} checkpointed (no memory plan off a GPU)"
    if cfg.memory_budget_gib:
        budget, source = cfg.memory_budget_gib * GiB, "memory_budget_gib"
    else:
        budget = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
        source = f"free on {torch.cuda.get_device_name(device)}"
    lora = lora_settings(model)
    setup = Setup(lora_r=lora["r"], lora_targets=tuple(lora["targets"]), lora_dropout=lora["dropout"],
                  lora_dtype=next(iter(lora_state_dict(model).values())).dtype,
                  quant="nf4" if any(is_4bit(m) for m in model.modules()) else None,
                  compute_dtype=PRECISIONS[cfg.precision])
    choice = choose_plan(model.config, cfg.batch_size, cfg.max_len, budget,
                         fixed={**cfg.fixed_plan(), "embedding_on_host": host}, setup=setup)
    o, plan, n = choice["options"], choice["plan"], choice["options"].layers_checkpointed(L)
    keeps = " (their recompute keeps its weights)" if o.keep_weights and n else ""
    offloads = (f", their inputs{' and the embedding table' if plan['inputs']['embedding_on_host'] else ''} in "
                f"host memory ({plan['cpu'] / GiB:.2f} GiB pinned)") if o.offload and n else ""
    line = (f"memory plan for a budget of {budget / GiB:.1f} GiB ({source}): fast layers, {o.cached_layers}/{L} "
            f"layers' weights kept dequantized, {n}/{L} checkpointed{keeps}{offloads}, loss chunk {o.loss_chunk}; "
            f"predicted peak {plan['total'] / GiB:.2f} GiB at {cfg.batch_size} x {cfg.max_len} tokens")
    if not choice["fits"]:
        line += "; that exceeds the budget: lower batch_size or max_len"
    return o, line


def _setup_feed(model, tokenizer, examples, cfg: TrainConfig, options: PlanOptions, dense: bool) -> Feed:
    """The micro-batch stream. On the GPU, lengths padded to a multiple of PAD_MULTIPLE make a few batch shapes
    that recur: each CUDA graph and each of cuBLAS's per-shape GEMM choices is made once and reused."""
    device, vocab, table = model.lm_head.weight.device, model.lm_head.weight.shape[0], host_embedding(model)
    collate = Collator(tokenizer.pad_token_id, pack=cfg.pack, max_len=cfg.max_len,
                       pad_to_multiple_of=PAD_MULTIPLE if options.fast and device.type == "cuda" else None)
    return Feed(examples, cfg.batch_size, cfg.seed, cfg.group_by_length, collate,
                lambda batch: to_device(batch, device, vocab, dense=dense, embedding=table), *_process())


def _setup_optimizer(model, cfg: TrainConfig, total_steps: int):
    """(optimizer, schedule) over the trainable (LoRA) parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # the fused CUDA kernel updates every LoRA tensor in one launch, and takes the GradScaler's inf check on
        # the GPU without a host sync
        opt = torch.optim.AdamW(params, fused=params[0].is_cuda, **kw)
    else:
        import bitsandbytes as bnb

        choices = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                   "paged_adamw": bnb.optim.PagedAdamW}
        opt = choices[cfg.optimizer](params, **kw)
    warmup = int(cfg.warmup_ratio * total_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(warmup, total_steps, cfg.schedule))


def _lr_factor(warmup: int, total: int, schedule: str):
    def factor(step):  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _apply_settings(opt, sched, cfg: TrainConfig):
    """This config's lr and weight decay in the optimizer and the schedule, at the schedule's current step (the
    values LambdaLR sets itself; a resumed state brings back the ones it was saved with)."""
    sched.base_lrs = [cfg.lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, lr=cfg.lr * factor(sched.last_epoch))
    sched._last_lr = [group["lr"] for group in opt.param_groups]


# ---------------------------------------------------------------- around the steps

def _evaluate(stepper: Stepper, evals, feed: Feed, cfg: TrainConfig, log: Metrics, step: int):
    loss = evaluate(stepper.model, evals, feed.collate, cfg.batch_size, cfg.precision, stepper.chunk)
    log.log({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))})


def _sample(model, tokenizer, cfg: TrainConfig, log: Metrics, step: int):
    """Greedy answers to the sample prompts, logged (process 0 only)."""
    if not cfg.sample_prompts or log.rank:
        return
    for prompt, answer in samples(model, tokenizer, cfg.sample_prompts, cfg.sample_max_new_tokens, cfg.precision):
        log.log({"step": step, "prompt": prompt, "sample": answer})
        log.say(f"[step {step}] {prompt!r} -> {answer!r}")


class _StopRequest:
    """Ctrl-C while the loop runs asks it to stop after the step in progress: the loop then saves a checkpoint
    at that step boundary (with the RNG state of the steps to come, so resume is bit-exact) and raises
    Interrupted. A second Ctrl-C interrupts at once (KeyboardInterrupt). Only in the main thread of a single
    process: a signal does not reach data-parallel processes together, and there it interrupts at once."""

    def __init__(self, enabled: bool):
        self.asked, self.previous = False, None
        if enabled and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._ask)

    def _ask(self, signum, frame):
        self.asked = True
        self.close()
        print("\nCtrl-C: stopping after this step to save a checkpoint (press it again to stop at once, losing the "
              "steps since the last checkpoint)", flush=True)

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
