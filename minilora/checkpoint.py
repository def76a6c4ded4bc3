"""Training checkpoints: checkpoint-STEP/ holds the adapter, the training state and run.json, which records the
run's id and what shaped its state (base model, LoRA, batch, processes, seed, data...). Resume refuses a
checkpoint of another shape and says which settings it applies anew.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from array import array

import torch

from .adapter import CONFIG_NAME, WEIGHTS_NAME, CorruptFile, check_adapter, load_adapter, save_adapter, write_atomic
from .fsdp import full_lora_weights, full_optimizer_state, is_sharded, load_optimizer_state
from .rundir import (DAMAGED, RECORD_NAME, STATE_NAME, Run, RunDirError, checkpoints, read_record, step_of,
                     why_unusable)

STATE_KEYS = {"step", "optimizer", "scheduler", "scaler", "rng_cpu", "rng_cuda"}  # what save_checkpoint writes
# TrainConfig fields that shape a checkpoint's state or the data it continues on: resume refuses a change of them
SHAPE_FIELDS = ("batch_size", "grad_accum", "seed", "max_len", "pack", "group_by_length", "precision", "optimizer",
                "fsdp", "template")
NOT_SETTINGS = {"output_dir", "resume", "overwrite", "progress"}  # fields that describe the invocation, not the run


class ResumeMismatch(RunDirError):
    """A checkpoint whose run differs from this one in something that shaped its state."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, say); the previous one is intact."""


class DamagedCheckpoint(CorruptFile):
    """A checkpoint file that cannot be read back; `why` names it as rundir names a checkpoint's faults."""

    def __init__(self, path: str, name: str):
        self.why = f"{name} {DAMAGED}"
        super().__init__(os.path.join(path, self.why))


# ---------------------------------------------------------------- what a run is, and whether it may resume

def data_fingerprint(examples: list[dict]) -> str:
    """A hash of the encoded training examples (ids and labels, in order)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(array("q", ex["input_ids"]).tobytes() + b"|" + array("q", ex["labels"]).tobytes() + b"\n")
    return h.hexdigest()[:16]


def run_shape(cfg, examples: list[dict], base_model: str | None, world: int) -> dict:
    """What shapes a checkpoint's state: compared on resume."""
    if base_model and os.path.isdir(base_model):
        base_model = os.path.realpath(base_model)
    lora = {k: v for k, v in cfg.lora().record().items() if k != "dtype"}
    return {"base_model": base_model or None, **{f"lora_{k}": v for k, v in lora.items()},
            **{name: getattr(cfg, name) for name in SHAPE_FIELDS}, "processes": world,
            "data": data_fingerprint(examples)}


def check_resume(run: Run, shape: dict, cfg) -> dict:
    """Raise ResumeMismatch naming every field in which run.resume_from's run differs from `shape`; return the
    other settings that differ ({name: (old, new)}), which this run applies from its first step."""
    record = read_record(run.resume_from) if run.resume_from else {}
    old_shape = record.get("shape") or {}
    diffs = [f"{k} {old_shape[k]!r} -> {shape[k]!r}" for k in shape
             if k in old_shape and old_shape[k] != _jsonable(shape[k])]
    if diffs:
        why = (" (the encoded examples: other rows, tokenizer or chat template, or a template that writes today's "
               "date and cannot be given the run's day)") if any(d.startswith("data ") for d in diffs) else ""
        raise ResumeMismatch(f"cannot resume from {run.resume_from}: this run differs in {'; '.join(diffs)}{why}; "
                             "resume with the settings it was trained with, or start a new run in another output_dir")
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
    process 0 writes, with every process's RNG states (sharded: the full weights and optimizer state).
    """
    optimizer, scheduler, scaler, (rng_cpu, rng_cuda) = training
    path = os.path.join(run.output_dir, f"checkpoint-{step}")
    sharded = is_sharded(model)  # then every process gathers the full weights and optimizer state to process 0
    weights = full_lora_weights(model) if sharded else None
    state = {"step": step, "optimizer": full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng_cpu": rng_cpu,
             "rng_cuda": rng_cuda}
    if world > 1:
        state["rng_ranks"] = [None] * world  # [(cpu, cuda)] per process, 0 first
        torch.distributed.all_gather_object(state["rng_ranks"], (rng_cpu, rng_cuda))
        if rank:
            return path
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        # run.json first: what a kill mid-save leaves says whose it is, and the next claim of the run removes it
        write_atomic(os.path.join(tmp, RECORD_NAME), json.dumps({"run_id": run.run_id, "step": step, **record},
                                                                indent=2, default=str).encode())
        save_adapter(model, tmp, weights, record.get("chat_template"))
        write_atomic(os.path.join(tmp, STATE_NAME), lambda f: torch.save(state, f))
        if os.path.exists(path):
            _replacing(run, path)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = (run.checkpoints() or [None])[-1]
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(run.output_dir).free < 2**20
        raise CheckpointWriteError(
            f"could not write {path}: {'the disk is full' if full else e}; "
            + (f"the previous checkpoint {previous} is intact" if previous
               else "no earlier checkpoint of this run exists")
            + ("; free some space and resume with resume='latest'" if full else "")) from e
    for old in run.checkpoints()[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _replacing(run: Run, path: str):
    """Say why the save of `path`'s step replaces the checkpoint there: one that resume could not use. (The one
    resumed from, saved again at its own step, is replaced without a word.)"""
    if path == run.resume_from:
        return
    why = run.unusable.pop(path, None) or why_unusable(path)
    name = os.path.basename(path)
    print(f"replacing {name}, which could not be resumed ({why})" if why else
          f"replacing {name}, an earlier checkpoint of step {step_of(path)}", flush=True)


def load_training_state(model, path: str, optimizer, scheduler, scaler, rank: int = 0, world: int = 1) -> int:
    """Restore the adapter, optimizer, schedule, scaler and RNGs from a checkpoint dir; return its step.

    torch.load(weights_only=True) reads tensors and plain containers only, so a checkpoint from elsewhere
    cannot run code. A file that cannot be read raises DamagedCheckpoint (a CorruptFile), naming it, before
    anything is restored.
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
        raise DamagedCheckpoint(path, STATE_NAME)
    written_by = len(state.get("rng_ranks") or [None])
    if written_by != world:
        raise ResumeMismatch(f"{path} was written by {written_by} data-parallel process(es); resume it with as many "
                             f"(this run has {world}), e.g. torchrun --nproc-per-node {written_by}")
    _load_checkpoint_adapter(model, path)
    if is_sharded(model):
        load_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng_cpu, rng_cuda = state["rng_ranks"][rank] if world > 1 else (state["rng_cpu"], state["rng_cuda"])
    torch.set_rng_state(rng_cpu)
    if rng_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng_cuda)
    return state["step"]


def _load_checkpoint_adapter(model, path: str):
    """load_adapter, with a file that cannot be read named as a checkpoint's faults are (load_adapter leaves the
    model as it was when it fails)."""
    try:
        check_adapter(path)  # its CorruptFile is the config's; load_adapter's after it, the weights'
    except CorruptFile as e:
        raise DamagedCheckpoint(path, CONFIG_NAME) from e
    try:
        load_adapter(model, path)
    except CorruptFile as e:
        raise DamagedCheckpoint(path, WEIGHTS_NAME) from e


def resume(model, run: Run, optimizer, scheduler, scaler, rank: int = 0, world: int = 1) -> int:
    """load_training_state from run.resume_from; return its step, or 0 for a fresh start. With "latest", a
    checkpoint that cannot be resumed (a file missing or cut short, say) is named and the one before it is
    tried; a checkpoint named explicitly must load."""
    if run.resume_from is None:
        return 0
    if not run.latest:
        return load_training_state(model, run.resume_from, optimizer, scheduler, scaler, rank, world)
    # claim checked the files of resume_from and passed over those after it; the ones before it are checked here
    tried = [p for p in checkpoints(run.output_dir, complete=False) if step_of(p) <= step_of(run.resume_from)]
    for path in reversed(tried):
        why = why_unusable(path)
        if why is None:
            try:
                step = load_training_state(model, path, optimizer, scheduler, scaler, rank, world)
                run.resume_from = path
                return step
            except DamagedCheckpoint as e:
                why = e.why
        run.pass_over(path, why, rank)
    run.start_afresh(rank)
    return 0
