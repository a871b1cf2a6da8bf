"""Stopping a training job on purpose, so SLURM (or the user) can continue it later.

What each signal does while the training loop runs (DataLoader workers ignore all three, see
:mod:`pipeline.data.stream`, so a signal to the whole process group reaches only the trainer):

* SIGUSR1 (SLURM's ``--signal=B:USR1@<seconds>``) and SIGTERM (``scancel``, the time limit,
  SLURM's preemption, ``timeout``, ``kill -- -PGID``) set a flag; the training loop checks it
  at the next step boundary on all ranks (``Runtime.any``), saves a checkpoint and raises
  :class:`~pipeline.errors.StageInterrupted`, which the CLI turns into exit code
  ``REQUEUE_EXIT_CODE`` (75). A wall-time budget reached before the end does the same.
* SIGINT (Ctrl-C) does the same but exits 130 (the shell's code for an interrupt), so a user
  who pressed Ctrl-C is not told to requeue; the manifest says ``interrupted`` either way.
  A second Ctrl-C before the checkpoint raises ``KeyboardInterrupt`` at once (no checkpoint).
"""

from __future__ import annotations

import signal
import time
from typing import Any

from pipeline.errors import REQUEUE_EXIT_CODE

INTERRUPT_EXIT_CODE = 130
"""Exit code after SIGINT (128 + 2, what shells report for Ctrl-C)."""


class StopSignal:
    """Install handlers for SIGUSR1/SIGTERM/SIGINT for the lifetime of a ``with`` block."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, time_budget_s: float | None = None):
        self.received: str | None = None
        self.deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        self.received = name

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def reason(self) -> str | None:
        """Why this rank wants to stop now: a signal's name, 'time budget', or None."""
        if self.received:
            return self.received
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time budget"
        return None


def exit_code(reason: str) -> int:
    """The exit code of a stage stopped for ``reason`` (see the module docstring)."""
    return INTERRUPT_EXIT_CODE if reason == "SIGINT" else REQUEUE_EXIT_CODE
