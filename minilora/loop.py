"""train(): set-up, then the loop, read top to bottom, from a batch of token ids to an optimizer update."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time

import torch
import torch.distributed as dist

from .adapter import model_lora, save_adapter, trains_own_adapter
from .checkpoint import check_resume, resume, rng_state, run_shape, save_checkpoint
from .config import TrainConfig, default_precision
from .data import Collator, encoded
from .evaluate import shared_eval_loss
from .fast_path import FastPath, fast_path
from .feed import Feed
from .forward import to_device
from .fsdp import full_lora_weights, is_sharded, shard, training_device
from .generate import shared_samples
from .lora import add_lora, lora_layers, lora_state_dict
from .metrics import Metrics
from .model import prepare_for_training
from .optimizer import apply_settings, make_optimizer, optimizer_step
from .plan import PlanOptions
from .plan_choice import plan_run
from .processes import in_process_group, rank_and_world
from .rundir import begun_on, claim, read_record
from .step import Stepper
from .stop import Interrupted, StopRequest, signal_name
from .template import get_template


def train(model, tokenizer, train_rows, cfg: TrainConfig, eval_rows=None) -> list[dict]:
    """Fine-tune the model's LoRA weights on `train_rows`; return the history (the lines of metrics.jsonl).

    Rows are guanaco-format strings, {"text": ...} or {"messages": [...]} dicts, in a list or a Dataset, or
    the (examples, stats) that encode_rows returned, taken as they are. eval_rows likewise. The config, the
    data and the output directory are checked before the model is touched. A model without LoRA layers gets
    them from cfg. The final adapter lands in cfg.output_dir/adapter/.

    With a torch.distributed process group (torchrun), every process trains data-parallel on its own device:
    batch_size is per process, the loss is normalised by the supervised tokens of the whole global step, and
    the LoRA gradients are summed over the processes, so N processes train the adapter that one would at N x
    the batch. Process 0 alone logs and writes files. With fsdp=True the weights are sharded over the
    processes (fsdp.py).
    """
    start = time.perf_counter()
    device = training_device(model) if cfg.fsdp else next(model.parameters()).device
    # a new config, checked again when made (its fields may have changed since the first was), precision settled
    cfg = dataclasses.replace(cfg, precision=cfg.precision or default_precision(device))
    examples, stats, evals = _setup_data(model, tokenizer, train_rows, eval_rows, cfg)
    trains_own_adapter(model, cfg.lora())  # LoRA settings that differ from the model's are refused here, before the
    # output directory exists; _setup asks again for the answer
    rank, world = rank_and_world()
    run = claim(cfg.output_dir, cfg.resume, cfg.overwrite, rank)  # this run's directory, or refused
    try:
        with contextlib.ExitStack() as fast:  # a FastPath's running(), entered by _setup (fast_path.py)
            t = _setup(model, tokenizer, (examples, stats), cfg, run, fast)
            try:
                with StopRequest(world) as stop:  # from here a signal stops the run at a step boundary, saved
                    if not t.step:
                        t.log.log({"step": 0, **stats.record(), "memory_plan": t.plan_line,
                                   "adapter_start": t.record["adapter_start"]})
                        if evals:  # the baseline the eval curve is read against
                            _evaluate(t, evals)
                        _sample(t)
                    t.log.parts["set-up"] = time.perf_counter() - start - sum(t.log.parts.values())
                    model.train()
                    _steps(t, evals, stop)
                    _sample(t)
                    with t.log.timed("save"):
                        weights = full_lora_weights(model) if is_sharded(model) else None  # every process gathers
                        if rank == 0:
                            save_adapter(model, f"{cfg.output_dir}/adapter", weights, t.record["chat_template"])
                t.log.parts["steps"] = time.perf_counter() - start - sum(t.log.parts.values())
                t.log.report_parts(t.step)
            finally:
                t.log.close()
            if rank == 0:
                t.log.plot()
            if world > 1:
                dist.barrier()  # the adapter is there for every process when train() returns
            return t.log.history
    finally:
        run.release()


def _steps(t: _Training, evals, stop: StopRequest):
    """The loop, from step t.step to the last: each optimizer step, then what falls due after it. t.step counts
    the steps done."""
    cfg, log = t.cfg, t.log
    stream = t.feed.stream(t.step * cfg.grad_accum)
    log.restart_clock()
    while t.step < t.total_steps:
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        t.step = step = t.step + 1
        log.add(step, *optimizer_step(t.stepper, micro, t.opt, t.sched, cfg.max_grad_norm))
        last = step == t.total_steps
        signum = stop.due()  # asked at every boundary, by every process
        stopping = signum and not last  # at the last step the run ends as it would anyway
        due_log = step % cfg.log_every == 0 or last
        due_eval = evals and (last or (cfg.eval_every and step % cfg.eval_every == 0))
        due_sample = cfg.sample_every and step % cfg.sample_every == 0 and not last
        due_save = last or (cfg.save_every and step % cfg.save_every == 0) or stopping
        if not (due_log or due_eval or due_sample or due_save):
            continue
        log.drain()  # the one wait for the GPU, before anything that reads or saves these steps
        if due_log:
            log.log_interval(step, step * cfg.grad_accum / t.feed.per_epoch, t.sched.get_last_lr()[0], t.device)
        if due_eval:
            _evaluate(t, evals)
        if due_sample:
            _sample(t)
        if due_save:
            with t.log.timed("save"):
                path = save_checkpoint(t.model, t.run, step, (t.opt, t.sched, t.scaler, rng_state()), t.record,
                                       cfg.keep_last, log.rank, t.world)
        if stopping:
            raise Interrupted(f"stopped by {signal_name(signum)} after step {step}: saved {path}; resume it with "
                              "resume='latest', bit for bit as if never stopped", signum, path)
        log.restart_clock()


# ---------------------------------------------------------------- set-up

@dataclasses.dataclass
class _Training:
    """What the loop works with, made by _setup; `step` counts the optimizer steps done."""

    model: torch.nn.Module
    tokenizer: object
    cfg: TrainConfig
    run: object  # rundir.Run
    device: torch.device
    world: int
    stepper: Stepper
    feed: Feed
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    log: Metrics
    step: int
    total_steps: int
    plan_line: str
    record: dict  # each checkpoint's run.json


def _setup(model, tokenizer, data: tuple, cfg: TrainConfig, run, cleanup: contextlib.ExitStack) -> _Training:
    """The run's set-up after the data (encoded: examples, DataStats) and the directory: the resume check, LoRA and
    the memory plan, the step (with the plan's FastPath, whose running() `cleanup` enters), the micro-batch stream,
    optimizer and schedule, the resumed state, the log."""
    rank, world = rank_and_world()
    examples, stats = data
    own_adapter = trains_own_adapter(model, cfg.lora())  # the run trains the adapter the model carries
    shape = run_shape(cfg, examples, getattr(model, "name_or_path", None), world)
    changed = check_resume(run, shape, cfg)  # a resumed checkpoint must come from a run of this shape
    options, plan_line, shape_plan = _setup_model(model, cfg, world)
    fast = fast_path(model, cfg, options, shape_plan)
    if fast:
        cleanup.enter_context(fast.running())
    scaler = torch.amp.GradScaler(model.lm_head.weight.device.type, enabled=cfg.precision == "fp16")
    stepper = Stepper(model, options.loss_chunk, cfg.precision, scaler, fast)
    feed = _setup_feed(model, tokenizer, examples, cfg, fast)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * feed.per_epoch / cfg.grad_accum))
    opt, sched = make_optimizer(model, cfg, total_steps)
    step = resume(model, run, opt, sched, scaler, rank, world)
    apply_settings(opt, sched, cfg)  # a resumed optimizer and schedule bring back their saved lr and decay
    # where the run's adapter started: a fresh one (from the seed), or the one the model carried
    start = "model" if own_adapter else "fresh"
    start = read_record(run.resume_from).get("adapter_start", start) if step else start
    log = Metrics(cfg, run, step, total_steps, scaler.is_enabled(), notes={"adapter_start": start})
    plan_line += f"; CUDA graphs {'on' if fast and fast.graphs else 'off'}"
    log.say(plan_line)
    if own_adapter and not step:
        log.say(f"training the adapter the model carries ({', '.join(model_lora(model).targets)}), not a "
                "fresh one")
    if step and changed:
        log.say(f"resumed from {run.resume_from} at step {step}, with changed settings applied from here on: "
                + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        log.log({"step": step, "resumed_from": run.resume_from, "changed": changed})
    return _Training(model, tokenizer, cfg, run, stepper.device, world, stepper, feed, opt, sched, scaler, log, step,
                     total_steps, plan_line,
                     {"shape": shape, "config": dataclasses.asdict(cfg), "adapter_start": start,
                      "chat_template": get_template(cfg.template, tokenizer).name, "day": stats.day})


def _setup_data(model, tokenizer, train_rows, eval_rows, cfg: TrainConfig):
    """(examples, stats, eval examples or None), checked before the model is touched."""
    day = begun_on(cfg.output_dir, cfg.resume)  # a resumed run's template writes the date its examples had
    examples, stats = encoded(train_rows, tokenizer, cfg.max_len, cfg.skip_malformed, cfg.template, day)
    evals = (encoded(eval_rows, tokenizer, cfg.max_len, cfg.skip_malformed, cfg.template, stats.day)[0]
             if eval_rows is not None else None)
    if cfg.precision == "fp16" and any(p.dtype != torch.float32 for p in lora_state_dict(model).values()):
        raise ValueError("fp16 needs fp32 LoRA weights; add_lora(..., dtype=torch.float32) or use precision='bf16'")
    if cfg.fsdp and not in_process_group():  # (its precision and optimizer: config.check)
        raise ValueError("fsdp=True needs a torch.distributed process group (torchrun --nproc-per-node N)")
    if rank_and_world()[0] == 0:
        print(stats.summary(cfg.max_len))  # before the progress bar exists, so that it is not on the bar's line
    return examples, stats, evals


def _setup_model(model, cfg: TrainConfig, world: int) -> tuple[PlanOptions, str, functools.partial | None]:
    """LoRA from cfg (when the model has none), then the decoder prepared as the memory plan says: plan_run's
    options, its line and its rule for shorter micro-batches."""
    torch.manual_seed(cfg.seed)
    if not lora_layers(model):
        add_lora(model, **dataclasses.asdict(cfg.lora()))  # fp32 master weights
    options, line, shape_plan = plan_run(model, cfg)
    prepare_for_training(model, options)
    if cfg.fsdp:
        shard(model, training_device(model))
        line += f"; sharded over {world} processes (FSDP2)"
    if world > 1:
        torch.manual_seed(cfg.seed + 1 + rank_and_world()[0])  # the same LoRA init everywhere, a dropout stream each
        line += "" if cfg.fsdp else f"; data-parallel over {world} processes"
    return options, line, shape_plan


def _setup_feed(model, tokenizer, examples, cfg: TrainConfig, fast: FastPath | None) -> Feed:
    """The micro-batch stream, moved to the device as the fast path moves it (else forward.to_device). Packed
    micro-batches are one row of batch_size x max_len tokens, the plan's worst padded micro-batch."""
    pack_tokens = cfg.batch_size * cfg.max_len if cfg.pack else None
    collate = Collator(tokenizer.pad_token_id, pack_tokens=pack_tokens, max_len=cfg.max_len,
                       pad_to_multiple_of=fast.pad_multiple if fast else None)
    move = fast.move if fast else functools.partial(to_device, device=model.lm_head.weight.device,
                                                      vocab_size=model.lm_head.weight.shape[0])
    return Feed(examples, cfg.batch_size, cfg.seed, cfg.group_by_length, collate, move, *rank_and_world(),
                pack_tokens=pack_tokens)


# ---------------------------------------------------------------- around the steps

def _evaluate(t: _Training, evals):
    with t.log.timed("eval"):
        loss = shared_eval_loss(t.model, evals, t.feed.collate, t.cfg.batch_size, t.cfg.precision, t.stepper.chunk)
    t.log.log({"step": t.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))})
    t.log.say(f"step {t.step} | eval loss {loss:.4f} | eval ppl {math.exp(min(loss, 50)):.2f}")


def _sample(t: _Training):
    """Greedy answers to the sample prompts, logged."""
    cfg = t.cfg
    if not cfg.sample_prompts:
        return
    with t.log.timed("samples"):
        answers = shared_samples(t.model, t.tokenizer, cfg.sample_prompts, cfg.sample_max_new_tokens, cfg.precision,
                                 cfg.template)
    for prompt, answer in answers:
        t.log.log({"step": t.step, "prompt": prompt, "sample": answer})
        t.log.say(f"[step {t.step}] {prompt!r} -> {answer!r}")
