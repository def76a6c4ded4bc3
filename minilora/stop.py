"""Ctrl-C during training: a stop at the next step boundary, after a checkpoint there."""

from __future__ import annotations

import signal
import threading


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped train() at a step boundary, after saving a checkpoint there; the message names it."""


class StopRequest:
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
