"""The run directory: one run owns its output_dir. `claim` locks it (a second run into it is refused while the
first lives), and a directory that already holds a run is continued only with resume and replaced only with
overwrite; a run writes and deletes only its own files (checkpoint-STEP/, adapter/, metrics.jsonl, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import uuid

from .adapter import CONFIG_NAME, WEIGHTS_NAME

STATE_NAME = "training_state.pt"  # in each checkpoint: the optimizer, schedule, scaler and RNG states
RECORD_NAME = "run.json"  # in each checkpoint: the run's id, step, shape and config
CHECKPOINT_FILES = (STATE_NAME, WEIGHTS_NAME, CONFIG_NAME, RECORD_NAME)  # what a checkpoint holds
LOCK_NAME = ".minilora.lock"
RUN_FILES = ("adapter", "train_config.json", "metrics.jsonl", "loss.png")  # besides checkpoint-STEP/: a run's own
MISSING, DAMAGED = "is missing", "cannot be read back: it is truncated or corrupt"  # why a checkpoint file fails
LEFTOVER = re.compile(r"checkpoint-(0|[1-9][0-9]*)\.tmp-([1-9][0-9]*)")  # a save's dir before its rename


class RunDirError(ValueError):
    """An output directory or a resume checkpoint that cannot be used as asked; the message says what to do."""


@dataclasses.dataclass
class Run:
    """This process's claim on an output directory: its lock, the run's id, and the checkpoint to resume."""

    output_dir: str
    run_id: str
    resume_from: str | None  # a checkpoint dir, or None for a fresh start
    lock: object = None  # the open, locked lock file (process 0 only)
    latest: bool = False  # resume="latest": a checkpoint that cannot be resumed gives way to the one before it
    unusable: dict = dataclasses.field(default_factory=dict)  # checkpoint dir -> why it could not be resumed
    created: bool = False  # this claim made output_dir (release removes it again if the run left it empty)

    def checkpoints(self) -> list[str]:
        """This run's complete checkpoints in output_dir, oldest first."""
        return [p for p in checkpoints(self.output_dir)
                if p not in self.unusable and read_record(p).get("run_id") == self.run_id]

    def pass_over(self, path: str, why: str, rank: int = 0):
        """Note that checkpoint dir `path` cannot be resumed, and why ("training_state.pt is missing"); process 0
        says so in the one form every such checkpoint gets."""
        self.unusable[path] = why
        if rank == 0:
            print(f"resume='latest': {os.path.join(path, why)}; trying the checkpoint before it", flush=True)

    def start_afresh(self, rank: int = 0):
        """resume='latest' found nothing to resume: say so, and start from step 0."""
        self.resume_from = None
        if rank == 0:
            print(f"resume='latest': no {'usable ' if self.unusable else ''}checkpoint in {self.output_dir}, starting "
                  "from step 0", flush=True)

    def release(self):
        _claims.pop(self.output_dir, None)
        if self.lock is not None:
            os.remove(self.lock.name)  # unlinked while still locked: no other process is between the two
            self.lock.close()
            self.lock = None
            if self.created:  # a run that failed before it wrote anything leaves nothing behind
                with contextlib.suppress(OSError):  # ENOTEMPTY: the run wrote something, or someone else did
                    os.rmdir(self.output_dir)


_claims: dict[str, Run] = {}  # output_dir -> this process's claim on it


def claim(output_dir: str, resume: str | None = None, overwrite: bool = False, rank: int = 0) -> Run:
    """Take output_dir for one run, or raise RunDirError saying why not and what to do.

    Process 0 locks it (the lock goes with the process, so a dead owner's lock is free). A directory holding
    minilora's files of an earlier run is refused unless resume="latest" or a checkpoint path continues it, or
    overwrite=True replaces it: that run's files are deleted then, and named. "latest" names each checkpoint
    that cannot be resumed, newest first, and takes the one before it. Process 0 deletes the leftovers of this
    run's saves cut short. Calling it again in the same process returns the same claim.
    """
    output_dir = os.path.abspath(output_dir)
    if output_dir in _claims:
        return _claims[output_dir]
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                          "overwrite replaces it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunDirError(f"output_dir {output_dir} is a file; pass a directory")
    run = Run(output_dir, "", None, latest=resume == "latest", created=not os.path.exists(output_dir))
    run.lock = _lock(output_dir) if rank == 0 else None
    try:
        found = _run_files(output_dir)
        if found and not (resume or overwrite):
            raise RunDirError(f"output_dir {output_dir} already holds a run ({', '.join(found[:4])}"
                              f"{' ...' if len(found) > 4 else ''}); continue it with resume='latest' (--resume "
                              "latest), replace it with overwrite=True (--overwrite), or choose another output_dir")
        if overwrite and found and rank == 0:
            for name in found:
                _remove_run_file(os.path.join(output_dir, name))
            print(f"overwrite: removed the earlier run's {', '.join(found)} from {output_dir}")
        run.resume_from = _resume_target(run, resume, rank)
        read_history(output_dir, float("inf") if run.resume_from else 0)  # a damaged metrics.jsonl fails here
        if run.latest and run.resume_from is None:
            run.start_afresh(rank)
        run.run_id = read_record(run.resume_from)["run_id"] if run.resume_from else uuid.uuid4().hex
        if rank == 0:
            _remove_leftovers(run, overwrite)
    except BaseException:
        run.release()
        raise
    _claims[output_dir] = run
    return run


def _remove_run_file(path: str):
    """Delete what a run wrote at path: a file, a checkpoint dir, or adapter/'s two files (anything else a user
    put in adapter/ stays, and so does the dir then)."""
    if not os.path.isdir(path):
        os.remove(path)
    elif os.path.basename(path) != "adapter":
        shutil.rmtree(path)
    else:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        if not os.listdir(path):
            os.rmdir(path)


def _remove_leftovers(run: Run, overwrite: bool):
    """Delete the checkpoint-STEP.tmp-PID dirs that saves cut short left in output_dir (their process is gone) and
    that are this run's: their run.json names its id, or they have none yet (with overwrite, any run's); name
    them. A dir whose process lives is being written, and is left alone, as is everything else."""
    removed = []
    for name in sorted(os.listdir(run.output_dir)):
        path, m = os.path.join(run.output_dir, name), LEFTOVER.fullmatch(name)
        if not m or os.path.islink(path) or not os.path.isdir(path) or not _gone(int(m[2])):
            continue
        if overwrite or not os.path.lexists(os.path.join(path, RECORD_NAME)) or \
                read_record(path).get("run_id") == run.run_id:
            shutil.rmtree(path)
            removed.append(name)
    if removed:
        print(f"removed {', '.join(removed)} from {run.output_dir}: left by saves cut short (their processes are "
              "gone)")


def _gone(pid: int) -> bool:
    """Whether no process has this id (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's process (EPERM), or no possible id: not ours to judge
        return False
    return False


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
    names = [os.path.basename(p) for p in checkpoints(output_dir, complete=False)]
    return names + [n for n in RUN_FILES if os.path.exists(os.path.join(output_dir, n))]


def _resume_target(run: Run, resume: str | None, rank: int) -> str | None:
    """The checkpoint dir to resume from: for "latest" the newest in output_dir whose files are all there, each
    newer one passed over and named (None if there is none); or the one named, which must be such a checkpoint
    and not be older than a complete checkpoint already in output_dir."""
    if not resume:
        return None
    if resume == "latest":
        for path in reversed(checkpoints(run.output_dir, complete=False)):
            why = why_unusable(path)
            if why is None:
                return path
            run.pass_over(path, why, rank)
        return None
    path = os.path.abspath(resume)
    why = why_unusable(path) if os.path.isdir(path) else None
    if not os.path.isdir(path) or why:
        what = f"cannot be resumed: {os.path.join(path, why)}" if why else (
            "is not a directory" if os.path.exists(path) else "does not exist")
        raise RunDirError(f"resume={resume!r} {what}; pass a checkpoint-STEP dir, or 'latest'")
    later = {p: why_unusable(p) for p in checkpoints(run.output_dir, complete=False) if step_of(p) > step_of(path)}
    if complete := [p for p, why in later.items() if why is None]:
        raise RunDirError(f"output_dir {run.output_dir} holds {os.path.basename(complete[-1])}, later than {resume}: "
                          "resuming there would mix two continuations of the run; resume into another output_dir")
    run.unusable.update(later)  # the save that reaches one of them names it
    return path


def why_unusable(path: str) -> str | None:
    """Why checkpoint dir `path` cannot be resumed, as far as the presence of its files and its run.json tell
    ("training_state.pt is missing", "run.json cannot be read back: ..."); None if they are sound. The content
    of the adapter and the training state is checked where they are loaded (checkpoint.load_training_state)."""
    for name in CHECKPOINT_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} {MISSING}"
    return None if "run_id" in read_record(path) else f"{RECORD_NAME} {DAMAGED}"


def checkpoints(output_dir: str, complete: bool = True) -> list[str]:
    """The checkpoint-STEP dirs in output_dir, by step (complete ones hold every file and a readable run.json)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    # exactly the names a run writes: checkpoint-STEP.tmp-PID leftovers of a save cut short, and a user's
    # checkpoint-5-old or checkpoint-05, are not checkpoints
    steps = sorted(int(m[1]) for d in names if (m := re.fullmatch(r"checkpoint-(0|[1-9][0-9]*)", d)))
    paths = [os.path.join(output_dir, f"checkpoint-{s}") for s in steps]
    return [p for p in paths if not complete or why_unusable(p) is None]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-STEP dir in output_dir, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def begun_on(output_dir: str, resume: str | None) -> str | None:
    """The day the run that `resume` continues began, as its checkpoints record it (run.json's "day": the date its
    chat template wrote), or None: no resume, or a run whose template writes no date."""
    if not resume:
        return None
    found = reversed(checkpoints(output_dir)) if resume == "latest" else [resume]
    return next((day for path in found if (day := read_record(path).get("day"))), None)


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


def step_of(path: str) -> int:
    return int(os.path.basename(path).split("-")[1])


def read_record(path: str) -> dict:
    """A checkpoint's run.json, or {} when it has none or it cannot be read."""
    try:
        with open(os.path.join(path, RECORD_NAME)) as f:
            record = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return {}
    return record if isinstance(record, dict) else {}
