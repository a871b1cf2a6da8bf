"""Helpers the tests share: a free TCP port for torchrun, a preemption at a chosen step, and a
DeepSpeed config for toy models."""

import json
import socket
from pathlib import Path

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


def small_deepspeed_config(directory: Path, stage: int) -> Path:
    """The shipped ZeRO config, written to ``directory``, with small communication buckets:
    DeepSpeed's default buckets are allocated up front (and NaN-filled under deterministic
    algorithms), slow for a toy model. Under ZeRO-3 every parameter is partitioned."""
    config = json.loads(
        (Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"zero{stage}.json").read_text()
    )
    small = (
        {"reduce_bucket_size": 100_000, "allgather_bucket_size": 100_000}
        if stage < 3
        else {
            "reduce_bucket_size": 100_000,
            "stage3_prefetch_bucket_size": 100_000,
            "stage3_param_persistence_threshold": 0,
        }
    )
    config["zero_optimization"].update(small)
    path = directory / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return path
