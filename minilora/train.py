"""The training loop: one function, read top to bottom, from a batch of token ids to an optimizer update."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .adapter import adapter_config, save_adapter
from .checkpoint import check_resume, claim, read_history, resume, rng_state, run_shape, save_checkpoint
from .data import Collator, batches
from .template import IGNORE, DataStats, encode_prompt, encode_rows
from .lora import add_lora, lora_layers, lora_state_dict
from .kernels.layer import host_embedding, unsupported
from .kernels.lora4bit import is_4bit
from .kernels.graphs import PAD_MULTIPLE, GraphedSteps
from .loss import causal_lm_loss, supervised_count, to_device
from .model import place_embedding, prepare_for_training
from .plan import LOSS_CHUNKS, GiB, choose_plan

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw")
# BOS and "[INST]  [/INST]" alone take about 10 ids under LLaMA's tokenizer, and truncation keeps a quarter of
# max_len for the question: 64 leaves room for a short question and 48 tokens of answer. Below it an example is
# mostly markup, or BOS plus a stray answer token.
MIN_MAX_LEN = 64


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults follow the classic guanaco QLoRA recipe for Llama-2-7B."""

    output_dir: str = "out"  # checkpoints, metrics.jsonl, loss.png and the final adapter/ go here
    # --- data
    max_len: int = 1024  # tokens per example (at least MIN_MAX_LEN); longer ones are truncated as encode_chat says
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    pack: bool = False  # several examples per row, attention kept inside each example
    skip_malformed: bool = False  # skip and count malformed rows (stats.malformed) instead of raising MalformedRow
    group_by_length: bool = True  # batch similar lengths together: less padding, same examples per epoch
    # --- length of the run
    epochs: float = 1.0  # passes over the training rows; ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps; overrides epochs
    # --- optimisation
    lr: float = 2e-4
    schedule: str = "cosine"  # "cosine" (decay to 0) or "constant", both after linear warmup
    warmup_ratio: float = 0.03  # fraction of the steps spent warming up from 0 to lr
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3  # clip the global LoRA gradient norm to this
    optimizer: str = "adamw"  # "adamw" (torch), "adamw_8bit" or "paged_adamw_8bit" / "paged_adamw" (bitsandbytes)
    seed: int = 42  # LoRA init, dropout and data order
    # --- LoRA, used when the model has none yet
    lora_r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    targets: tuple = ("q_proj", "v_proj")
    # --- precision and memory
    # "bf16" autocast, "fp16" autocast + GradScaler + fp32 LoRA weights, "fp32", or None: default_precision()
    precision: str | None = None
    # On a GPU the memory plan (minilora.plan.choose_plan) picks the fastest way to train that fits the budget:
    # which layers keep their weights dequantized, which are checkpointed, the loss chunk. The fields below
    # that are None are its to choose; set them to decide yourself.
    memory_budget_gib: float | None = None  # GPU memory the run may use; None: what the card has free at start
    fast: bool = True  # minilora's decoder-layer forward for training (minilora/kernels/layer.py); False: transformers'
    gradient_checkpointing: bool | None = None  # recompute layers in backward: True all, False none; None: the plan
    offload_activations: bool | None = None  # checkpointed layer inputs (and, single-process, the embedding
    # table) in pinned CPU memory, copied on a side stream; None: the plan, when nothing else fits the budget
    fused: bool = False  # with fast=False: LoRA layers as one autograd function (minilora/kernels)
    compile: bool = False  # torch.compile each transformers decoder layer (replaces fast)
    cuda_graphs: bool = True  # when nothing is checkpointed: replay each batch shape's step as a CUDA graph
    loss_chunk: int | None = None  # supervised tokens per chunk of the vocabulary projection; None: the plan (4096)
    # --- logging, evaluation, samples, checkpoints
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int | None = None  # steps between evaluations (and one at the end) when eval rows are given
    sample_every: int | None = None  # steps between greedy samples of sample_prompts (and at start and end)
    sample_prompts: tuple = ()  # user messages to answer greedily
    sample_max_new_tokens: int = 64
    save_every: int | None = None  # steps between checkpoints (one is always written at the end)
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    resume: str | None = None  # a checkpoint dir, or "latest" for the newest one in output_dir
    overwrite: bool = False  # replace the earlier run in output_dir (its files are deleted); else it is refused
    progress: bool = True  # show a tqdm bar

    def __post_init__(self):
        _check(self)

    def fixed_plan_options(self, num_layers: int) -> dict:
        """The memory plan's options that this config decides itself (choose_plan's `fixed`): its None fields
        are the plan's to choose."""
        fixed = {"loss_chunk": self.loss_chunk} if self.loss_chunk else {}
        if self.gradient_checkpointing is not None:
            fixed["gradient_checkpointing"] = num_layers if self.gradient_checkpointing else 0
        if self.offload_activations is not None:
            fixed["offload"] = self.offload_activations
        return fixed


def train(model, tokenizer, train_rows, cfg: TrainConfig, eval_rows=None) -> list[dict]:
    """Fine-tune the model's LoRA weights on `train_rows`; return the history (the lines of metrics.jsonl).

    Rows are guanaco-format strings, {"text": ...} or {"messages": [...]} dicts, in a list or a Dataset, or
    the (examples, stats) that encode_rows returned, taken as they are: encode once, before the model loads,
    and a bad dataset fails in seconds. eval_rows likewise. The config and the data are checked before the
    model is touched. A model without LoRA layers gets them from cfg. The final adapter lands in
    cfg.output_dir/adapter/.

    With a torch.distributed process group (torchrun), every process trains data-parallel on its own device
    through DDP: batch_size is per process, global batch k holds what one process at batch N x batch_size
    would take as its batch k (process r takes every N-th example of it), and the loss is normalised by the
    supervised tokens of the whole global step, so N processes train the adapter that one would at N x the
    batch. Process 0 alone logs, evaluates, samples and writes files.
    """
    _check(cfg)  # again: the fields may have changed since the config was made
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    show = cfg.progress and rank == 0
    cfg = dataclasses.replace(cfg, precision=cfg.precision or default_precision(device))
    examples, stats = _encoded(train_rows, tokenizer, cfg)
    evals = _encoded(eval_rows, tokenizer, cfg)[0] if eval_rows is not None else None
    if cfg.precision == "fp16" and any(p.dtype != torch.float32 for p in lora_state_dict(model).values()):
        raise ValueError("fp16 needs fp32 LoRA weights; add_lora(..., dtype=torch.float32) or use precision='bf16'")
    if show:  # before the progress bar exists, so that it does not land on the bar's line
        print(stats.summary(cfg.max_len))
    # the output directory is this run's (or refused) before the model is touched, and a resumed checkpoint
    # must come from a run of the same shape
    run = claim(cfg.output_dir, cfg.resume, cfg.overwrite, rank)
    try:
        shape = run_shape(cfg, examples, getattr(model, "name_or_path", None), world, _lora_settings(model))
        changed = check_resume(run, shape, cfg)
        return _train(model, tokenizer, cfg, (examples, stats, evals), run, {"shape": shape, "changed": changed})
    finally:
        run.release()


def _train(model, tokenizer, cfg, data, run, record):
    examples, stats, evals = data
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    show = cfg.progress and rank == 0
    torch.manual_seed(cfg.seed)
    if not lora_layers(model):
        add_lora(model, cfg.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)  # fp32 master weights
    options, plan_line = _memory_options(model, cfg, device, world)
    chunk = options.pop("loss_chunk")
    # DDP needs every parameter on one device: the embedding table stays there with several processes
    prepare_for_training(model, fused=cfg.fused, compile=cfg.compile, embedding_on_host=None if world == 1 else False,
                         **options)
    table = host_embedding(model)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.lm_head.weight.shape[0]
    # CUDA graphs (kernels/graphs.py) when no layer recomputes and no weight is dequantized inside a step
    graphs = (cfg.cuda_graphs and options["fast"] and device.type == "cuda" and not options["gradient_checkpointing"]
              and options["cached_layers"] == model.config.num_hidden_layers and cfg.precision != "fp16"
              and not cfg.pack and world == 1)
    step_graphs = GraphedSteps(model, chunk) if graphs else None
    plan_line += f"; CUDA graphs {'on' if graphs else 'off'}" + (f"; data-parallel over {world} processes" if world > 1 else "")
    if show:
        print(plan_line)
    # DDP all-reduces the LoRA gradients, bucketed, while the backward runs. It wraps the loss: that module's
    # forward is the step's forward. The frozen weights and buffers (RoPE's) are the same in every process: no
    # broadcast, at the start or per step.
    ddp = DDP(_Loss(model, chunk), device_ids=[device.index] if device.type == "cuda" else None,
              init_sync=False, broadcast_buffers=False) if world > 1 else None
    if world > 1:
        torch.manual_seed(cfg.seed + 1 + rank)  # the same LoRA init everywhere, a dropout stream per process

    # On the GPU, lengths padded to a multiple of PAD_MULTIPLE make a few batch shapes that recur: each CUDA graph
    # and each of cuBLAS's per-shape GEMM choices is made once and reused.
    collate = Collator(tokenizer.pad_token_id, pack=cfg.pack, max_len=cfg.max_len,
                       pad_to_multiple_of=PAD_MULTIPLE if options["fast"] and device.type == "cuda" else None)
    per_epoch = math.ceil(len(examples) / (cfg.batch_size * world))  # (global) micro-batches in one pass
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))

    opt = _optimizer(params, cfg)
    warmup = int(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(warmup, total_steps, cfg.schedule))
    # A GradScaler multiplies the fp16 loss so small gradients survive, and skips steps whose grads overflow.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    step = resume(model, run, opt, sched, scaler, rank, world)
    _apply_settings(opt, sched, cfg)  # a resumed optimizer and schedule come back with the values they were saved with
    history = read_history(cfg.output_dir, step)  # a resumed run continues the metrics it resumed from
    saved = {"shape": record["shape"], "config": dataclasses.asdict(cfg)}  # what each checkpoint's run.json holds
    if world > 1:
        dist.barrier()  # every process has read what process 0 is about to rewrite
    metrics = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") if rank == 0 else None
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        metrics.writelines(json.dumps(line) + "\n" for line in history)
    if step and record["changed"] and rank == 0:
        print(f"resumed from {run.resume_from} at step {step}, with changed settings applied from here on: "
              + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in record["changed"].items()))

    def log(record):
        history.append(record)
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def log_eval():
        loss = evaluate(model, evals, collate, cfg)
        log({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))})

    def micro_batches(start):
        """(this process's micro-batch on the device, supervised tokens of the global one). The stream is a
        pure function of (seed, position), the same in every process: resumable mid-epoch."""
        k = start
        while True:
            epoch, i = divmod(k, per_epoch)
            order = batches(examples, cfg.batch_size * world, cfg.seed, group_by_length=cfg.group_by_length,
                            epoch=epoch)
            for batch in itertools.islice(order, i, None):
                share = batch[rank::world] or [_unsupervised(batch[0])]  # a short last batch: nothing to learn
                n = sum(supervised_count(ex["labels"]) for ex in batch)  # the global batch's, the same everywhere
                yield to_device(collate(share), device, vocab, dense=graphs, embedding=table), n  # async copies
            k = (epoch + 1) * per_epoch

    stream = micro_batches(step * cfg.grad_accum)
    bar = _progress(show, step, total_steps)
    if not step:
        log({"step": 0, "train_rows": stats.rows, "examples": len(examples), "skipped_rows": dict(stats.skipped),
             "truncated_rows": stats.truncated, "supervised_tokens": stats.supervised,
             "empty_questions": stats.empty_questions, "empty_answers": stats.empty_answers, "memory_plan": plan_line})
        if evals and rank == 0:  # the baseline the eval curve is read against
            log_eval()
        _sample(model, tokenizer, cfg, step, log, rank)
    model.train()
    # The step never waits for the GPU: loss sums and grad norms stay on it until `drain` reads the steps since
    # its last call, at once, before anything that needs them (a log line, an evaluation, a sample, a save).
    pending = []  # (step, loss_sum, n_tokens, grad_norm) of steps not yet read
    tokens_seen, loss_seen, seconds, grad_norm = 0, 0.0, 0.0, None  # since the last log line
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def drain():
        nonlocal tokens_seen, loss_seen, grad_norm
        values = torch.stack([torch.stack([loss, norm.float()]) for _, loss, _, norm in pending])
        if world > 1:  # the global step's loss: the sum of every process's part (grad norms are equal already)
            losses = values[:, 0].contiguous()
            dist.all_reduce(losses)
            values[:, 0] = losses
        values = values.tolist()
        for (s, _, n, _), (loss, norm) in zip(pending, values):
            # with a GradScaler an inf grad norm is an overflow: scaler.step() skipped it and lowered the scale
            if not math.isfinite(loss) or (not math.isfinite(norm) and not scaler.is_enabled()):
                last = (run.checkpoints() or [None])[-1]
                raise FloatingPointError(
                    f"loss {loss / n} / grad norm {norm} at step {s}; stopped without saving it or any later step. "
                    + (f"The last good checkpoint is {last}" if last else "This run has saved no checkpoint yet")
                    + "; try a lower lr" + (", or bf16" if cfg.precision == "fp16" else ""))
            tokens_seen, loss_seen, grad_norm = tokens_seen + n, loss_seen + loss, norm
        pending.clear()

    def forward_backward(b, n_step, last: bool):
        """One micro-batch: its summed loss (a GPU scalar); the gradient of loss / n_step goes into .grad.
        With DDP, whose all-reduce averages over the processes, the loss is scaled by their number: the
        gradients then sum to the global step's; they are reduced once per step, with its last micro-batch."""
        with _autocast(device, cfg.precision):
            if step_graphs:
                return step_graphs(b, 1.0 / n_step)
            with ddp.no_sync() if ddp and not last else contextlib.nullcontext():
                loss = ddp(b) if ddp else causal_lm_loss(model, b, chunk)[0]
                scaler.scale(loss * world / n_step).backward()
        return loss.detach()

    t0 = time.perf_counter()
    stop = _StopRequest(world == 1)
    try:
        while step < total_steps:
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            # Normalise by the supervised tokens of the whole optimizer step, so that batch 4 x accumulation 1
            # and batch 1 x accumulation 4 give the same gradient (a per-micro-batch mean would weight short
            # examples more). The count is known on the host: no wait.
            n_step = sum(n for _, n in micro)
            loss_sum = torch.zeros((), device=device)
            for j, (b, _) in enumerate(micro):
                loss_sum += forward_backward(b, n_step, last=j == len(micro) - 1)
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # a GPU scalar: no wait
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=not graphs)  # graphs accumulate into gradients at fixed addresses
            step += 1
            pending.append((step, loss_sum, n_step, norm))
            bar.update()
            due_log = step % cfg.log_every == 0 or step == total_steps
            due_eval = evals and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0))
            due_sample = cfg.sample_every and step % cfg.sample_every == 0 and step != total_steps
            due_save = step == total_steps or (cfg.save_every and step % cfg.save_every == 0) or stop.asked
            if not (due_log or due_eval or due_sample or due_save):
                continue
            drain()
            seconds += time.perf_counter() - t0  # training time only: evaluations, samples and saves come after
            if due_log:
                # the token-weighted mean over the steps since the last line, not the last step's alone
                rate = tokens_seen / seconds  # supervised tokens per second of training
                log({"step": step, "epoch": round(step * cfg.grad_accum / per_epoch, 4),
                     "loss": loss_seen / tokens_seen, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                     "tokens_per_s": rate, "seconds": seconds, "peak_mem_gib": _peak_gib(device)})
                bar.set_postfix(loss=f"{loss_seen / tokens_seen:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                tok_s=f"{rate:.0f}", refresh=False)
                tokens_seen, loss_seen, seconds = 0, 0.0, 0.0
            if due_eval and rank == 0:
                log_eval()
            if due_sample:
                _sample(model, tokenizer, cfg, step, log, rank)
            if due_save:
                save_checkpoint(model, run, step, (opt, sched, scaler, rng_state()), saved, cfg.keep_last, rank, world)
            if stop.asked:
                raise Interrupted(f"interrupted after step {step}: saved {run.output_dir}/checkpoint-{step}; resume it "
                                  "with resume='latest', bit for bit as if never stopped")
            t0 = time.perf_counter()
        stop.close()
        _sample(model, tokenizer, cfg, step, log, rank)
    finally:
        stop.close()
        bar.close()
        if metrics:
            metrics.close()
        for layer in model.model.layers:  # the fast layers' weight caches go with them; generation needs neither
            layer.__dict__.pop("_minilora_fast", None)
        place_embedding(model)  # back beside lm_head, where generation and transformers' forward want it
    if rank == 0:
        save_adapter(model, os.path.join(cfg.output_dir, "adapter"))
        _plot(history, cfg.output_dir)
    if world > 1:
        dist.barrier()  # the adapter is there for every process when train() returns
    return history


@torch.no_grad()
def evaluate(model, examples, collate, cfg: TrainConfig) -> float:
    """Token-weighted mean loss over `examples`, in micro-batches of cfg.batch_size (no grads kept)."""
    was_training = model.training
    model.eval()
    device, total, n = next(model.parameters()).device, 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        with _autocast(device, cfg.precision):
            loss, count = causal_lm_loss(model, collate(examples[i : i + cfg.batch_size]),
                                         cfg.loss_chunk or LOSS_CHUNKS[0])
        total, n = total + loss.item(), n + count
    model.train(was_training)
    return total / n


@torch.no_grad()
def generate(model, tokenizer, prompt, max_new_tokens: int = 64, precision: str | None = None) -> str:
    """Greedy answer to one user message (or a list of turns) under the LLaMA-2 template.

    It runs in eval mode (no LoRA dropout) and leaves the model in the mode it found. precision=None follows
    the model's compute dtype (its embeddings'): bf16 or fp16 autocast for a half-precision model, else fp32.
    """
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    precision = precision or next((name for name, d in PRECISIONS.items() if d == dtype), "fp32")
    ids = torch.tensor([encode_prompt(turns, tokenizer)], device=device)
    was_training = model.training
    model.eval()
    try:
        with _autocast(device, precision):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def default_precision(device: torch.device | str) -> str:
    """bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on a CPU."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _encoded(rows, tokenizer, cfg: TrainConfig) -> tuple[list[dict], DataStats]:
    """(examples, stats): encode_rows' result as it is, or rows encoded under cfg."""
    if not (isinstance(rows, tuple) and len(rows) == 2 and isinstance(rows[1], DataStats)):
        return encode_rows(rows, tokenizer, cfg.max_len, cfg.skip_malformed)
    longest = max(len(ex["input_ids"]) for ex in rows[0])
    if longest > cfg.max_len:
        raise ValueError(f"an encoded example has {longest} tokens, more than max_len={cfg.max_len}; "
                         "encode_rows with the max_len of the TrainConfig")
    return rows


def _sample(model, tokenizer, cfg, step, log, rank=0):
    """Greedy answers to the sample prompts (generate keeps the train/eval mode). Every RNG is restored
    afterwards, so sampling leaves the training trajectory exactly as it would have been without it."""
    if not cfg.sample_prompts or rank:
        return
    from tqdm.auto import tqdm

    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    table = host_embedding(model)
    place_embedding(model)  # generation runs transformers' forward, which wants the table on the device
    try:
        for prompt in cfg.sample_prompts:
            answer = generate(model, tokenizer, prompt, cfg.sample_max_new_tokens, cfg.precision)
            log({"step": step, "prompt": prompt, "sample": answer})
            if cfg.progress:
                tqdm.write(f"[step {step}] {prompt!r} -> {answer!r}")  # above the bar, never on its line
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if table is not None:
            place_embedding(model, "cpu")


def _autocast(device: torch.device, precision: str):
    """Mixed precision for "bf16" and "fp16"; plain fp32 compute for "fp32"."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def _check(cfg: TrainConfig):
    """Every field that can be checked without the model or the data; runs when a TrainConfig is made."""
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}; use one of {list(PRECISIONS)}, or None to pick by device")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule={cfg.schedule!r}; use 'cosine' or 'constant'")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={cfg.optimizer!r}; use one of {list(OPTIMIZERS)}")
    for name in ("batch_size", "grad_accum", "log_every", "keep_last", "lora_r", "sample_max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be at least 1")
    for name in ("max_steps", "eval_every", "sample_every", "save_every", "loss_chunk"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be at least 1, or None")
    if cfg.max_len < MIN_MAX_LEN:
        raise ValueError(f"max_len={cfg.max_len} must be at least {MIN_MAX_LEN}: the template's markup alone takes "
                         "about 10 tokens, and an example needs room for a question and an answer")
    # each condition holds for good values; NaN fails every comparison, so it is refused too
    rules = [("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "a positive number such as 2e-4"),
             ("epochs", math.isfinite(cfg.epochs) and cfg.epochs > 0, "a positive number"),
             ("max_grad_norm", cfg.max_grad_norm > 0, "positive"),
             ("lora_alpha", cfg.lora_alpha > 0, "positive"),
             ("weight_decay", cfg.weight_decay >= 0, "0 or more"),
             ("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "in [0, 1)"),
             ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
             ("memory_budget_gib", cfg.memory_budget_gib is None or cfg.memory_budget_gib > 0, "positive, or None")]
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)} must be {rule}")


def _memory_options(model, cfg: TrainConfig, device: torch.device, world: int = 1) -> tuple[dict, str]:
    """prepare_for_training's options and the loss chunk for this run, and a line that says what and why.

    On a GPU the fast layer's options come from the memory plan for the budget (cfg.memory_budget_gib, or what
    the card has free plus what this process already holds), for the worst micro-batch: batch_size x max_len
    tokens. Elsewhere, and with fast off, every layer is checkpointed and nothing is cached or offloaded,
    unless the config says otherwise.
    """
    L = model.config.num_hidden_layers
    ckpt = {None: L, True: L, False: 0}[cfg.gradient_checkpointing]
    options = dict(gradient_checkpointing=ckpt, fast=False, cached_layers=0, keep_weights=False,
                   offload=bool(cfg.offload_activations), loss_chunk=cfg.loss_chunk or LOSS_CHUNKS[0])
    why = unsupported(model.config)
    if not cfg.fast or cfg.compile or why:
        reason = "fast=False" if not cfg.fast else "compile=True" if cfg.compile else why
        return options, f"training through transformers' decoder layers ({reason}), {ckpt}/{L} layers checkpointed"
    options["fast"] = True
    if device.type != "cuda":
        return options, f"fast layers, {ckpt}/{L} checkpointed (no memory plan off a GPU)"
    if cfg.memory_budget_gib:
        budget, source = cfg.memory_budget_gib * GiB, "memory_budget_gib"
    else:
        free, _ = torch.cuda.mem_get_info(device)
        budget, source = free + torch.cuda.memory_allocated(device), f"free on {torch.cuda.get_device_name(device)}"
    layers = lora_layers(model)
    one = next(iter(layers.values()))
    choice = choose_plan(model.config, cfg.batch_size, cfg.max_len, budget, fixed=cfg.fixed_plan_options(L),
                         lora_r=one.r, lora_targets=sorted({name.rsplit(".", 1)[-1] for name in layers}),
                         quant="nf4" if any(is_4bit(m) for m in model.modules()) else None,
                         compute_dtype=PRECISIONS[cfg.precision], lora_dtype=one.lora_A.weight.dtype,
                         lora_dropout=getattr(one.dropout, "p", 0.0), embedding_on_host=None if world == 1 else False)
    o, plan = choice["options"], choice["plan"]
    options.update(o)
    keeps = " (their recompute keeps its weights)" if o["keep_weights"] and o["gradient_checkpointing"] else ""
    host = plan["inputs"]["embedding_on_host"]
    offloads = (f", their inputs{' and the embedding table' if host else ''} in host memory "
                f"({plan['cpu'] / GiB:.2f} GiB pinned)") if o["offload"] and o["gradient_checkpointing"] else ""
    line = (f"memory plan for a budget of {budget / GiB:.1f} GiB ({source}): fast layers, "
            f"{o['cached_layers']}/{L} layers' weights kept dequantized, {o['gradient_checkpointing']}/{L} "
            f"checkpointed{keeps}{offloads}, loss chunk {o['loss_chunk']}; predicted peak {plan['total'] / GiB:.2f} "
            f"GiB at {cfg.batch_size} x {cfg.max_len} tokens")
    if not choice["fits"]:
        line += "; that exceeds the budget: lower batch_size or max_len" + (
            "" if o["offload"] else ", or let it offload (offload_activations=None)")
    return options, line


def _optimizer(params, cfg: TrainConfig):
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # the fused CUDA kernel updates every LoRA tensor in one launch, and takes the GradScaler's inf check
        # on the GPU without a host sync
        return torch.optim.AdamW(params, fused=params[0].is_cuda, **kw)
    import bitsandbytes as bnb

    choices = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw": bnb.optim.PagedAdamW}
    return choices[cfg.optimizer](params, **kw)


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
    same values LambdaLR sets itself; on resume, the saved states bring back the values they were saved with)."""
    sched.base_lrs = [cfg.lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, lr=cfg.lr * factor(sched.last_epoch))
    sched._last_lr = [group["lr"] for group in opt.param_groups]


def _lora_settings(model) -> dict | None:
    """The model's LoRA r, alpha, dropout and targets, or None when it has no LoRA layers yet."""
    if not lora_layers(model):
        return None
    c = adapter_config(model)
    return dict(r=c["r"], alpha=c["lora_alpha"], dropout=c["lora_dropout"], targets=c["target_modules"])


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped train() at a step boundary, after saving a checkpoint there; the message names it."""


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


class _Loss(torch.nn.Module):
    """causal_lm_loss as a module, for DDP to wrap: its forward is the step's forward, and its parameters (the
    model's) include the LoRA weights whose gradients DDP all-reduces."""

    def __init__(self, model, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch):
        return causal_lm_loss(self.model, batch, self.chunk)[0]


def _unsupervised(example: dict) -> dict:
    """A copy of example that supervises nothing: the input of a process whose share of a short last global
    batch is empty. It takes part in the step (DDP needs every process there) and adds nothing to it."""
    return {**example, "labels": [IGNORE] * len(example["labels"])}


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _progress(show: bool, step, total):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, disable=not show, desc="train", unit="step", dynamic_ncols=True)


def _plot(history, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping loss.png (pip install 'minilora[plot]')")
        return
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points), marker="o" if label == "eval" else None, label=label)
    ax.set(xlabel="step", ylabel="loss", title="minilora")
    ax.legend()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)

