"""The training loop: one function, read top to bottom, from a batch of token ids to an optimizer update."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from .checkpoint import latest_checkpoint, load_training_state, save_adapter, save_checkpoint
from .data import Collator, batches, encode_prompt, encode_rows
from .lora import add_lora, lora_layers
from .loss import causal_lm_loss
from .model import prepare_for_training

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults follow the classic guanaco QLoRA recipe for Llama-2-7B."""

    output_dir: str = "out"  # checkpoints, metrics.jsonl, loss.png and the final adapter/ go here
    # --- data
    max_len: int = 1024  # tokens per example; longer ones are truncated as minilora.data.encode_chat says
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    pack: bool = False  # several examples per row, attention kept inside each example
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
    precision: str = "bf16"  # "bf16" autocast, "fp16" autocast + GradScaler + fp32 LoRA weights, or "fp32"
    gradient_checkpointing: bool = True  # recompute each decoder layer in backward instead of storing it
    offload_activations: bool = False  # keep the checkpointed layer inputs in CPU memory
    fused: bool = False  # LoRA layers as one autograd function (minilora/kernels): faster, same numbers
    compile: bool = False  # torch.compile each decoder layer: fastest on a GPU after ~10 s of compiling
    loss_chunk: int = 4096  # supervised tokens per chunk of the vocabulary projection
    # --- logging, evaluation, samples, checkpoints
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int | None = None  # steps between evaluations (and one at the end) when eval rows are given
    sample_every: int | None = None  # steps between greedy samples of sample_prompts (and at start and end)
    sample_prompts: tuple = ()  # user messages to answer greedily
    sample_max_new_tokens: int = 64
    save_every: int | None = None  # steps between checkpoints (one is always written at the end)
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    resume: str | None = None  # a checkpoint dir, or "latest" for the newest one in output_dir
    progress: bool = True  # show a tqdm bar


def train(model, tokenizer, train_rows, cfg: TrainConfig, eval_rows=None) -> list[dict]:
    """Fine-tune the model's LoRA weights on `train_rows`; return the history (the lines of metrics.jsonl).

    Rows are guanaco-format strings, {"text": ...} or {"messages": [...]} dicts, in a list or a Dataset.
    A model without LoRA layers gets them from cfg. The final adapter lands in cfg.output_dir/adapter/.
    """
    _check(cfg)
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    if not lora_layers(model):
        # fp16 keeps fp32 LoRA weights: fp16 Adam updates would underflow, and the GradScaler refuses fp16 grads
        add_lora(model, cfg.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                 dtype=torch.float32 if cfg.precision == "fp16" else None)
    prepare_for_training(model, cfg.gradient_checkpointing, cfg.offload_activations, cfg.fused, cfg.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.precision == "fp16" and any(p.dtype != torch.float32 for p in params):
        raise ValueError("fp16 needs fp32 LoRA weights; add_lora(..., dtype=torch.float32) or use precision='bf16'")

    examples, stats = encode_rows(train_rows, tokenizer, cfg.max_len)
    evals = encode_rows(eval_rows, tokenizer, cfg.max_len)[0] if eval_rows is not None else None
    collate = Collator(tokenizer.pad_token_id, pack=cfg.pack, max_len=cfg.max_len)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)  # micro-batches in one pass over the data
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))

    opt = _optimizer(params, cfg)
    warmup = int(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(warmup, total_steps, cfg.schedule))
    # A GradScaler multiplies the fp16 loss so small gradients survive, and skips steps whose grads overflow.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    os.makedirs(cfg.output_dir, exist_ok=True)
    step = 0
    resume_dir = latest_checkpoint(cfg.output_dir) if cfg.resume == "latest" else cfg.resume
    if resume_dir:
        step = load_training_state(model, resume_dir, opt, sched, scaler)
    with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    history = _history_until(cfg.output_dir, step)  # a resumed run continues the metrics it resumed from
    metrics = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w")
    for record in history:
        metrics.write(json.dumps(record) + "\n")

    def log(record):
        history.append(record)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def log_eval():
        loss = evaluate(model, evals, collate, cfg)
        log({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))})

    def micro_batches(start):  # the data stream is a pure function of (seed, position): resumable mid-epoch
        k = start
        while True:
            epoch, i = divmod(k, per_epoch)
            order = batches(examples, cfg.batch_size, cfg.seed, group_by_length=cfg.group_by_length, epoch=epoch)
            for batch in itertools.islice(order, i, None):
                yield collate(batch)
            k = (epoch + 1) * per_epoch

    stream = micro_batches(step * cfg.grad_accum)
    bar = _progress(cfg, step, total_steps)
    if not step:
        log({"step": 0, "train_rows": stats.rows, "examples": len(examples), "skipped_rows": dict(stats.skipped),
             "truncated_rows": stats.truncated, "supervised_tokens": stats.supervised})
        if cfg.progress:
            print(f"{len(examples)} examples from {stats.rows} rows, {stats.supervised} supervised tokens; "
                  f"{stats.truncated} truncated to {cfg.max_len} tokens; skipped: {dict(stats.skipped) or 'none'}")
        if evals:  # the baseline the eval curve is read against
            log_eval()
        _sample(model, tokenizer, cfg, step, log)
    model.train()
    tokens_seen, loss_seen, seconds = 0, 0.0, 0.0  # since the last log line; seconds of training steps only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            # Normalise by the supervised tokens of the whole optimizer step, so that batch 4 x accumulation 1
            # and batch 1 x accumulation 4 give the same gradient (a per-micro-batch mean would weight short
            # examples more).
            n_step = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            loss_sum = torch.zeros((), device=device)
            for b in micro:
                b = {k: v.to(device) for k, v in b.items()}
                with _autocast(device, cfg.precision):
                    loss, _ = causal_lm_loss(model, b, cfg.loss_chunk)
                scaler.scale(loss / n_step).backward()
                loss_sum += loss.detach()
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            loss_total = loss_sum.item()
            loss_value = loss_total / n_step
            if not math.isfinite(loss_value) or (not math.isfinite(grad_norm) and not scaler.is_enabled()):
                # with a GradScaler an inf grad norm is an overflow: scaler.step() skips it and lowers the scale
                raise FloatingPointError(
                    f"loss {loss_value} / grad norm {grad_norm} at step {step + 1}; stopped without saving it. "
                    f"The last good checkpoint is {latest_checkpoint(cfg.output_dir)}; try a lower lr or bf16")
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen, loss_seen = tokens_seen + n_step, loss_seen + loss_total
            seconds += time.perf_counter() - t0  # the optimizer's queued GPU work lands in the next step's wait
            rate = tokens_seen / seconds  # supervised tokens per second of training, evals and saves excluded
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", tok_s=f"{rate:.0f}",
                            refresh=False)
            bar.update()
            if step % cfg.log_every == 0 or step == total_steps:
                # the token-weighted mean over the steps since the last line, not the last step's alone
                log({"step": step, "epoch": round(step * cfg.grad_accum / per_epoch, 4),
                     "loss": loss_seen / tokens_seen, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                     "tokens_per_s": rate, "peak_mem_gib": _peak_gib(device)})
                tokens_seen, loss_seen, seconds = 0, 0.0, 0.0
            if evals and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                log_eval()
            if cfg.sample_every and step % cfg.sample_every == 0 and step != total_steps:
                _sample(model, tokenizer, cfg, step, log)
            if step == total_steps or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(model, cfg.output_dir, step, opt, sched, scaler, cfg.keep_last)
        _sample(model, tokenizer, cfg, step, log)
    except KeyboardInterrupt:
        # Stop cleanly: the last completed step is a consistent state, so save it and return.
        opt.zero_grad(set_to_none=True)
        print(f"\ninterrupted: saved {save_checkpoint(model, cfg.output_dir, step, opt, sched, scaler, cfg.keep_last)}")
        return history
    finally:
        bar.close()
        metrics.close()
    save_adapter(model, os.path.join(cfg.output_dir, "adapter"))
    _plot(history, cfg.output_dir)
    return history


@torch.no_grad()
def evaluate(model, examples, collate, cfg: TrainConfig) -> float:
    """Token-weighted mean loss over `examples`, in micro-batches of cfg.batch_size (no grads kept)."""
    was_training = model.training
    model.eval()
    device, total, n = next(model.parameters()).device, 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i : i + cfg.batch_size]).items()}
        with _autocast(device, cfg.precision):
            loss, count = causal_lm_loss(model, b, cfg.loss_chunk)
        total, n = total + loss.item(), n + count
    model.train(was_training)
    return total / n


@torch.no_grad()
def generate(model, tokenizer, prompt, max_new_tokens: int = 64, precision: str = "bf16") -> str:
    """Greedy answer to one user message (or a list of turns) under the LLaMA-2 template."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(turns, tokenizer)], device=device)
    with _autocast(device, precision):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _sample(model, tokenizer, cfg, step, log):
    """Greedy answers to the sample prompts. Train/eval mode and every RNG are restored afterwards, so
    sampling leaves the training trajectory exactly as it would have been without it."""
    if not cfg.sample_prompts:
        return
    was_training, cpu_rng = model.training, torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        for prompt in cfg.sample_prompts:
            answer = generate(model, tokenizer, prompt, cfg.sample_max_new_tokens, cfg.precision)
            log({"step": step, "prompt": prompt, "sample": answer})
            if cfg.progress:
                print(f"\n[step {step}] {prompt!r} -> {answer!r}")
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _autocast(device: torch.device, precision: str):
    """Mixed precision for "bf16" and "fp16"; plain fp32 compute for "fp32"."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def _check(cfg: TrainConfig):
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}; use one of {list(PRECISIONS)}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule={cfg.schedule!r}; use 'cosine' or 'constant'")
    for name in ("batch_size", "grad_accum", "max_len", "log_every", "keep_last"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be at least 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"max_steps={cfg.max_steps} must be at least 1, or None to train for cfg.epochs")


def _optimizer(params, cfg: TrainConfig):
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    choices = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw": bnb.optim.PagedAdamW}
    if cfg.optimizer not in choices:
        raise ValueError(f"optimizer={cfg.optimizer!r}; use 'adamw' or one of {list(choices)}")
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


def _history_until(output_dir, step) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not step or not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["step"] <= step]


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _progress(cfg, step, total):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, disable=not cfg.progress, desc="train", unit="step", dynamic_ncols=True)


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

