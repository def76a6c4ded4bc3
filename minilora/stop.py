"""Stops by signal: Ctrl-C (SIGINT), or a scheduler's SIGTERM, SIGHUP or SIGUSR1 (Slurm, Kubernetes, `timeout` and
torchrun send SIGTERM first), asks train() to stop at the next step boundary, after a checkpoint there; a second
signal stops at once. Processes of a torch.distributed group agree on the step."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

# SIGUSR1 is a scheduler's advance warning (Slurm's --signal=USR1@120); SIGHUP, a closed terminal or session
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")
                     if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A signal stopped train(). `checkpoint`: the checkpoint saved at the step boundary where it stopped (resume it
    bit for bit), or None when a second signal stopped it at once. `signal`: the signal's number; a command-line
    tool exits with `exit_status`, 128 + that number, as a shell reports a command a signal ended."""

    def __init__(self, message: str, signum: int, checkpoint: str | None = None):
        super().__init__(message)
        self.signal, self.checkpoint = signum, checkpoint

    @property
    def exit_status(self) -> int:
        return 128 + self.signal


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """The stop signals' handlers while train() runs (a context manager; in the main thread only, where Python
    runs signal handlers). The first signal asks the loop to stop after the step in progress: `due` then says so
    at a step boundary, and the loop saves a checkpoint there (with the RNG state of the steps to come, so that
    resume is bit-exact) and raises Interrupted. A second signal of any kind raises Interrupted at once.

    Data-parallel processes may each get the signal at another time, or only some of them. At each boundary every
    process posts the signal it has had (0 for none) to an all-reduce (MAX) on a gloo group of their own, without
    waiting, and reads the result at the next boundary, by when every process has posted it: they all stop at the
    same step, and a step never waits for the agreement.
    """

    def __init__(self, world: int = 1):
        self.signum, self.previous = 0, {}  # the first signal received (0: none), the handlers to restore
        self.group = dist.new_group(backend="gloo") if world > 1 else None  # every process makes it, together
        self.posted = self.pending = None  # the last boundary's flag, and its all-reduce in flight

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._receive) for s in STOP_SIGNALS}
        return self

    def _receive(self, signum, frame):
        if self.signum:
            raise Interrupted(f"{signal_name(signum)} after {signal_name(self.signum)}: stopped at once; the steps "
                              "since the last checkpoint are lost", signum)
        self.signum = signum
        what, again = ("Ctrl-C", "press it again") if signum == signal.SIGINT else (signal_name(signum), "signal again")
        print(f"\n{what}: stopping after this step to save a checkpoint ({again} to stop at once, losing the steps "
              "since the last checkpoint)", flush=True)

    def due(self) -> int:
        """At a step boundary: the signal to stop for here, or 0 to go on. Called at every boundary by every
        process: one process stops for its own signal; several stop for any process's signal posted at the
        boundary before."""
        if self.group is None:
            return self.signum
        agreed = 0
        if self.pending is not None:
            self.pending.wait()
            agreed = int(self.posted)
        self.posted = torch.tensor(self.signum, dtype=torch.int32)
        self.pending = dist.all_reduce(self.posted, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        if self.group is not None:
            if self.pending is not None:  # every process posted as many flags: the last all-reduce completes
                self.pending.wait()
            dist.destroy_process_group(self.group)
            self.group = self.pending = None
