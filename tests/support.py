"""Helpers the tests share: a free TCP port for torchrun, and a preemption at a chosen step."""

import socket

from pipeline.runtime import preemption


def free_port() -> int:
    """A TCP port nobody listens on (torchrun's --master_port; port 0 would hang its rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def signal_before_step(monkeypatch, step: int) -> None:
    """Make the training loop see SIGUSR1 at its stop check before ``step`` (checked before
    steps 0, 1, ...), as if SLURM had sent it."""
    calls = {"n": 0}

    def reason(self):
        calls["n"] += 1
        return "SIGUSR1" if calls["n"] == step + 1 else None

    monkeypatch.setattr(preemption.StopSignal, "reason", reason)
