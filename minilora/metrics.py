"""What a run reports: the history that train() returns, metrics.jsonl, what it prints (a progress bar on a terminal,
plain lines elsewhere) and loss.png."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from .rundir import read_history


class Metrics:
    """The run's log. Step values stay on the GPU (`add`) until `drain` reads every pending step at once, before
    anything that needs them: the step never waits for the GPU. Process 0 alone writes files and prints: a progress
    bar where stderr is a terminal and cfg.progress, else a plain line per log interval (a redirected log gets no
    bar's carriage returns)."""

    def __init__(self, cfg, run, step: int, total_steps: int, overflow_skips: bool = False, notes: dict | None = None):
        self.cfg, self.run, self.overflow_skips = cfg, run, overflow_skips
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.history = read_history(cfg.output_dir, step)  # a resumed run continues the metrics it resumed from
        self.pending = []  # (step, loss_sum, n_tokens, grad_norm) of steps not yet read
        self.tokens, self.loss, self.seconds, self.grad_norm = 0, 0.0, 0.0, None  # since the last log line
        self.clock = time.perf_counter()
        self.parts = collections.Counter()  # the run's wall time by part: set-up, steps, eval, samples, save
        if self.world > 1:
            dist.barrier()  # every process has read what process 0 is about to rewrite
        self.file = None
        if self.rank == 0:
            with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
                # what this run uses, changes on resume included, and notes such as where its adapter started
                json.dump({**dataclasses.asdict(cfg), **(notes or {})}, f, indent=2)
            self.file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w")
            self.file.writelines(json.dumps(record) + "\n" for record in self.history)
        self.total_steps, self.first_step, self.start = total_steps, step, time.perf_counter()
        self.bar = None
        if cfg.progress and self.rank == 0 and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict):
        self.history.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def say(self, text: str):
        """A line for the user on stdout, above the progress bar (never on its line); process 0 only."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.rank == 0:
            print(text, flush=True)

    def add(self, step: int, loss_sum: torch.Tensor, n_tokens: int, grad_norm: torch.Tensor):
        self.pending.append((step, loss_sum, n_tokens, grad_norm))
        if self.bar is not None:
            self.bar.update()

    def drain(self):
        """Read the pending steps' losses and grad norms, in one wait, then stop the training clock: the wait for
        the GPU to finish these steps is training time. A NaN or inf stops the run at that step, before anything
        is saved from it."""
        if self.pending:
            self._read_pending()
        self.seconds += time.perf_counter() - self.clock

    def _read_pending(self):
        values = torch.stack([torch.stack([loss for _, loss, _, _ in self.pending]),
                              torch.stack([norm.float() for *_, norm in self.pending])])  # (2, steps): loss, norm
        if self.world > 1:  # the global step's loss: the sum of every process's part (grad norms are equal already)
            dist.all_reduce(values[0])
        for (step, _, n, _), loss, norm in zip(self.pending, *values.tolist()):
            # with a GradScaler an inf grad norm is an overflow: scaler.step() skipped it and lowered the scale
            if not math.isfinite(loss) or (not math.isfinite(norm) and not self.overflow_skips):
                last = (self.run.checkpoints() or [None])[-1]
                raise FloatingPointError(
                    f"loss {loss / n} / grad norm {norm} at step {step}; stopped without saving it or any later step. "
                    + (f"The last good checkpoint is {last}" if last else "This run has saved no checkpoint yet")
                    + "; try a lower lr" + (", or bf16" if self.cfg.precision == "fp16" else ""))
            self.tokens, self.loss, self.grad_norm = self.tokens + n, self.loss + loss, norm
        self.pending.clear()

    def log_interval(self, step: int, epoch: float, lr: float, device: torch.device):
        """The token-weighted mean loss over the steps since the last line (not the last step's alone), and the
        supervised tokens per second of training time (evaluations, samples and saves not counted)."""
        rate = self.tokens / self.seconds
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        self.log({"step": step, "epoch": round(epoch, 4), "loss": self.loss / self.tokens, "lr": lr,
                  "grad_norm": self.grad_norm, "tokens_per_s": rate, "seconds": self.seconds, "peak_mem_gib": peak})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.loss / self.tokens:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}",
                                 refresh=False)
        else:
            elapsed = time.perf_counter() - self.start
            left = elapsed / (step - self.first_step) * (self.total_steps - step)
            self.say(f"step {step}/{self.total_steps} | loss {self.loss / self.tokens:.4f} | lr {lr:.2e} | "
                     f"{rate:,.0f} tok/s | elapsed {_clock(elapsed)} | left {_clock(left)}")
        self.tokens, self.loss, self.seconds = 0, 0.0, 0.0

    @contextlib.contextmanager
    def timed(self, part: str):
        """Adds the wall time of the block to parts[part]."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] += time.perf_counter() - start

    def report_parts(self, step: int):
        """Where the run's wall time went: set-up (up to the first step, the baseline eval and samples aside), the
        steps, evaluation, samples and saving (checkpoints and the adapter)."""
        seconds = {part: round(self.parts[part], 2) for part in ("set-up", "steps", "eval", "samples", "save")}
        self.log({"step": step, "time": seconds})
        self.say("time: " + ", ".join(f"{part} {s:.1f} s" for part, s in seconds.items()))

    def restart_clock(self):
        self.clock = time.perf_counter()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()
            self.file = None

    def plot(self):
        """loss.png beside metrics.jsonl: the train and eval curves (when matplotlib is installed)."""
        try:
            from matplotlib.figure import Figure  # a figure of its own: no pyplot state, no backend to set
        except ImportError:
            print("matplotlib is not installed: skipping loss.png (pip install 'minilora[plot]')")
            return
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for key, label in (("loss", "train"), ("eval_loss", "eval")):
            points = [(h["step"], h[key]) for h in self.history if key in h]
            if points:
                ax.plot(*zip(*points), marker="o" if label == "eval" else None, label=label)
        ax.set(xlabel="step", ylabel="loss", title="minilora")
        ax.legend()
        fig.savefig(os.path.join(self.cfg.output_dir, "loss.png"), dpi=100, bbox_inches="tight")


def _clock(seconds: float) -> str:
    """h:mm:ss"""
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"
