"""The run directory and its training checkpoints.

One run owns its output_dir: `claim` locks it (a second run into it is refused while the first lives), and a
directory that already holds a run is continued only with resume and replaced only with overwrite. Each
checkpoint-STEP/ holds the adapter, the training state and `run.json`: the run's id and what shaped its state
(base model, LoRA, batch, processes, seed, data...), so that resume refuses a checkpoint that does not match
and says which settings it applies anew. A run writes and deletes only its own files.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
from array import array

import torch

from .adapter import CorruptFile, load_adapter, save_adapter, write_atomic

STATE_NAME = "training_state.pt"
STATE_KEYS = {"step", "optimizer", "scheduler", "scaler", "rng_cpu", "rng_cuda"}  # what save_checkpoint writes
RECORD_NAME = "run.json"
LOCK_NAME = ".minilora.lock"
RUN_FILES = ("adapter", "train_config.json", "metrics.jsonl", "loss.png")  # besides checkpoint-STEP/: a run's own
# TrainConfig fields that shape a checkpoint's state or the data it continues on: resume refuses a change of them
SHAPE_FIELDS = ("batch_size", "grad_accum", "seed", "max_len", "pack", "group_by_length", "precision", "optimizer")
NOT_SETTINGS = {"output_dir", "resume", "overwrite", "progress"}  # fields that describe the invocation, not the run


class RunDirError(ValueError):
    """An output directory or a resume checkpoint that cannot be used as asked; the message says what to do."""


class ResumeMismatch(RunDirError):
    """A checkpoint whose run differs from this one in something that shaped its state."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, say); the previous one is intact."""


@dataclasses.dataclass
class Run:
    """This process's claim on an output directory: its lock, the run's id, and the checkpoint to resume."""

    output_dir: str
    run_id: str
    resume_from: str | None  # a checkpoint dir, or None for a fresh start
    lock: object = None  # the open, locked lock file (process 0 only)

    def checkpoints(self) -> list[str]:
        """This run's complete checkpoints in output_dir, oldest first."""
        return [p for p in checkpoints(self.output_dir) if read_record(p).get("run_id") == self.run_id]

    def release(self):
        _claims.pop(self.output_dir, None)
        if self.lock is not None:
            os.remove(self.lock.name)  # unlinked while still locked: no other process is between the two
            self.lock.close()
            self.lock = None


_claims: dict[str, Run] = {}  # output_dir -> this process's claim on it


def claim(output_dir: str, resume: str | None = None, overwrite: bool = False, rank: int = 0) -> Run:
    """Take output_dir for one run, or raise RunDirError saying why not and what to do.

    Process 0 locks it (the lock goes with the process, so a dead owner's lock is free). A directory holding
    minilora's files of an earlier run is refused unless resume="latest" or a checkpoint path continues it, or
    overwrite=True replaces it: that run's files are deleted then, and named. Calling it again in the same
    process returns the same claim.
    """
    output_dir = os.path.abspath(output_dir)
    if output_dir in _claims:
        return _claims[output_dir]
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                          "overwrite replaces it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunDirError(f"output_dir {output_dir} is a file; pass a directory")
    lock = _lock(output_dir) if rank == 0 else None
    try:
        found = _run_files(output_dir)
        if found and not (resume or overwrite):
            raise RunDirError(f"output_dir {output_dir} already holds a run ({', '.join(found[:4])}"
                              f"{' ...' if len(found) > 4 else ''}); continue it with resume='latest' (--resume "
                              "latest), replace it with overwrite=True (--overwrite), or choose another output_dir")
        if overwrite and found and rank == 0:
            for name in found:
                path = os.path.join(output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            print(f"overwrite: removed the earlier run's {', '.join(found)} from {output_dir}")
        resume_from = _resume_target(output_dir, resume)
        read_history(output_dir, float("inf") if resume_from else 0)  # a damaged metrics.jsonl fails here, not later
        if resume == "latest" and resume_from is None and rank == 0:
            print(f"resume='latest': no checkpoint in {output_dir}, starting from step 0")
        run_id = read_record(resume_from).get("run_id") if resume_from else None
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    run = _claims[output_dir] = Run(output_dir, run_id or uuid.uuid4().hex, resume_from, lock)
    return run


def _lock(output_dir: str):
    try:
        os.makedirs(output_dir, exist_ok=True)
        f = open(os.path.join(output_dir, LOCK_NAME), "a+")
    except OSError as e:
        raise RunDirError(f"cannot write to output_dir {output_dir} ({e.strerror}); choose a directory you can "
                          "write to") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"output_dir {output_dir} is in use by {owner}; wait for it to finish, or choose "
                          "another output_dir") from None
    if not os.path.exists(f.name) or not os.path.samestat(os.fstat(f.fileno()), os.stat(f.name)):
        f.close()  # its owner removed it between our open and our lock: lock the file that is there now
        return _lock(output_dir)
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]})\n")
    f.flush()
    return f


def _run_files(output_dir: str) -> list[str]:
    """The names in output_dir that a minilora run writes."""
    if not os.path.isdir(output_dir):
        return []
    names = [os.path.basename(p) for p in checkpoints(output_dir, complete=False)]
    return names + [n for n in RUN_FILES if os.path.exists(os.path.join(output_dir, n))]


def _resume_target(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint dir to resume from: the newest in output_dir for "latest" (None if there is none), or the
    one named, which must be a checkpoint and not be older than a checkpoint already in output_dir."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = os.path.abspath(resume)
    if not os.path.isfile(os.path.join(path, STATE_NAME)):
        what = "does not exist" if not os.path.exists(path) else f"is not a minilora checkpoint (no {STATE_NAME})"
        raise RunDirError(f"resume={resume!r} {what}; pass a checkpoint-STEP dir, or 'latest'")
    later = [p for p in checkpoints(output_dir) if _step(p) > _step(path)]
    if later:
        raise RunDirError(f"output_dir {output_dir} holds {os.path.basename(later[-1])}, later than {resume}: resuming "
                          "there would mix two continuations of the run; resume into another output_dir")
    return path


def checkpoints(output_dir: str, complete: bool = True) -> list[str]:
    """The checkpoint-STEP dirs in output_dir, by step (complete ones hold the training state)."""
    if not os.path.isdir(output_dir):
        return []
    steps = [int(d.split("-")[1]) for d in os.listdir(output_dir)
             if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]  # skips .tmp- leftovers
    paths = [os.path.join(output_dir, f"checkpoint-{s}") for s in sorted(steps)]
    return [p for p in paths if os.path.isfile(os.path.join(p, STATE_NAME))] if complete else paths


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-STEP dir in output_dir, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def read_history(output_dir: str, step: float) -> list[dict]:
    """The records of output_dir/metrics.jsonl up to `step` (none for step 0). A line cut short at the end (a
    kill mid-write) is dropped; a bad line before the end raises RunDirError naming it."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not step or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    records = []
    for k, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise RunDirError(f"{path}, line {k + 1}, is not JSON; fix or delete that line to resume") from None
    return [r for r in records if r.get("step", 0) <= step]


def _step(path: str) -> int:
    return int(os.path.basename(path).split("-")[1])


def read_record(path: str) -> dict:
    """A checkpoint's run.json, or {} when it has none."""
    try:
        with open(os.path.join(path, RECORD_NAME)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------- what a run is, and whether it may resume

def data_fingerprint(examples: list[dict]) -> str:
    """A hash of the encoded training examples (ids and labels, in order)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(array("q", ex["input_ids"]).tobytes() + b"|" + array("q", ex["labels"]).tobytes() + b"\n")
    return h.hexdigest()[:16]


def run_shape(cfg, examples: list[dict], base_model: str | None, world: int, lora: dict | None = None) -> dict:
    """What shapes a checkpoint's state: compared on resume. lora: the model's LoRA settings when it has LoRA
    layers already (else cfg's apply)."""
    if base_model and os.path.isdir(base_model):
        base_model = os.path.realpath(base_model)
    lora = lora or dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=sorted(cfg.targets))
    return {"base_model": base_model or None, **{f"lora_{k}": v for k, v in lora.items()},
            **{name: getattr(cfg, name) for name in SHAPE_FIELDS}, "processes": world,
            "data": data_fingerprint(examples)}


def check_resume(run: Run, shape: dict, cfg) -> dict:
    """Raise ResumeMismatch naming every field in which run.resume_from's run differs from `shape`; return the
    other settings that differ ({name: (old, new)}), which this run applies from its first step."""
    record = read_record(run.resume_from) if run.resume_from else {}
    old_shape = record.get("shape") or {}
    diffs = [f"{k} {old_shape[k]!r} -> {shape[k]!r}" for k in shape if k in old_shape and old_shape[k] != _jsonable(shape[k])]
    if diffs:
        raise ResumeMismatch(f"cannot resume from {run.resume_from}: this run differs in {'; '.join(diffs)}; resume "
                             "with the settings it was trained with, or start a new run in another output_dir")
    old = record.get("config") or {}
    new = _jsonable(dataclasses.asdict(cfg))
    return {k: (old[k], new[k]) for k in new if k in old and k not in NOT_SETTINGS and old[k] != new[k]}


def _jsonable(value):
    return json.loads(json.dumps(value))  # tuples become lists, as in run.json


# ---------------------------------------------------------------- writing and reading checkpoints

def rng_state() -> tuple:
    """(CPU RNG state, every CUDA device's RNG state): what a checkpoint restores so that dropout continues."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def save_checkpoint(model, run: Run, step: int, training: tuple, record: dict, keep_last: int = 2,
                    rank: int = 0, world: int = 1) -> str:
    """Write output_dir/checkpoint-STEP/: the adapter, the training state and run.json; delete this run's
    checkpoints beyond the newest keep_last. training: (optimizer, scheduler, scaler, rng_state()).

    The directory appears only when complete, so a crash or a full disk mid-save leaves the previous one; a
    failed write raises CheckpointWriteError saying so. Data-parallel (world > 1): every process calls it, and
    process 0 writes, with every process's RNG states.
    """
    optimizer, scheduler, scaler, (rng_cpu, rng_cuda) = training
    path = os.path.join(run.output_dir, f"checkpoint-{step}")
    ranks = None
    if world > 1:
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, (rng_cpu, rng_cuda))
        if rank:
            return path
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng_cpu": rng_cpu, "rng_cuda": rng_cuda,
             **({"rng_ranks": ranks} if ranks else {})}  # [(cpu, cuda)] per process, 0 first
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, tmp)
        write_atomic(os.path.join(tmp, STATE_NAME), lambda f: torch.save(state, f))
        write_atomic(os.path.join(tmp, RECORD_NAME), json.dumps({"run_id": run.run_id, "step": step, **record},
                                                                indent=2, default=str).encode())
        if os.path.exists(path):  # the same step again (a resumed run that stops where it started): replace it
            shutil.rmtree(path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = (run.checkpoints() or [None])[-1]
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(run.output_dir).free < 2**20
        raise CheckpointWriteError(
            f"could not write {path}: {'the disk is full' if full else e}; "
            + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint of this run exists")
            + "; free some space and resume with resume='latest'" * full) from e
    for old in run.checkpoints()[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_state(model, path: str, optimizer, scheduler, scaler, rank: int = 0, world: int = 1) -> int:
    """Restore the adapter, optimizer, schedule, scaler and RNGs from a checkpoint dir; return its step.

    torch.load(weights_only=True) reads tensors and plain containers only, so a checkpoint from elsewhere
    cannot run code. A file that cannot be read raises CorruptFile, naming it, before anything is restored.
    """
    state_path = os.path.join(path, STATE_NAME)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path} is not a minilora checkpoint (no {STATE_NAME}); pass a checkpoint-STEP dir")
    with open(state_path, "rb") as f:  # so that what fails below is the file's content, not access to it
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # RuntimeError, OSError, EOFError or UnpicklingError, as the damage falls
            state = None  # torch's own message may suggest weights_only=False, which lets a file run code
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        raise CorruptFile(f"{state_path} cannot be read back: it is truncated or corrupt")
    written_by = len(state.get("rng_ranks") or [None])
    if written_by != world:
        raise ResumeMismatch(f"{path} was written by {written_by} data-parallel process(es); resume it with as many "
                             f"(this run has {world}), e.g. torchrun --nproc-per-node {written_by}")
    load_adapter(model, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng_cpu, rng_cuda = state["rng_ranks"][rank] if world > 1 else (state["rng_cpu"], state["rng_cuda"])
    torch.set_rng_state(rng_cpu)
    if rng_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng_cuda)
    return state["step"]


def resume(model, run: Run, optimizer, scheduler, scaler, rank: int = 0, world: int = 1) -> int:
    """load_training_state from run.resume_from; return its step, or 0 for a fresh start. With "latest", a
    corrupt checkpoint (a file cut short, say) is named and the one before it is tried."""
    if run.resume_from is None:
        return 0
    tried = [p for p in checkpoints(run.output_dir) if _step(p) <= _step(run.resume_from)]
    for path in reversed(tried if run.resume_from in tried else [run.resume_from]):
        try:
            step = load_training_state(model, path, optimizer, scheduler, scaler, rank, world)
            run.resume_from = path
            return step
        except CorruptFile as e:
            if run.resume_from not in tried:
                raise
            if not rank:
                print(f"resume='latest': {e}; trying the checkpoint before it")
    if not rank:
        print(f"resume='latest': no readable checkpoint in {run.output_dir}, starting from step 0")
    run.resume_from = None
    return 0
