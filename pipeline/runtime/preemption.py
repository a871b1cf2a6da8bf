"""Stopping a training job on purpose, so SLURM (or the user) can continue it later.

SIGUSR1 (SLURM's ``--signal=B:USR1@<seconds>``) and SIGTERM set a flag; the training loop
checks it at the next step boundary on all ranks (``Runtime.any``), saves a checkpoint and
raises :class:`~pipeline.errors.StageInterrupted`, which the CLI turns into exit code
``REQUEUE_EXIT_CODE``. A step or wall-time budget reached before the end does the same.
"""

from __future__ import annotations

import signal
import time


class StopSignal:
    """Install handlers for SIGUSR1/SIGTERM for the lifetime of a ``with`` block."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, time_budget_s: float | None = None):
        self.received: str | None = None
        self.deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignal":
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
