"""Randomness is passed in, never global: every seed is derived from a tuple of integers.

``derive_seed(seed, epoch, rank, worker, index)`` gives the same number on every machine and
Python version (sha256, not ``hash()``), so results depend on the tuple alone: not on the
number of processes, the batch size or the order in which work happens to run.
"""

from __future__ import annotations

import hashlib
import random

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across runs, platforms, versions)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from ``derive_seed(*parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def python_rng(*parts: int | str) -> random.Random:
    return random.Random(derive_seed(*parts))


def uniform_fraction(*parts: int | str) -> float:
    """A number in [0, 1) fixed by ``parts``: for splits that must not depend on order."""
    return derive_seed(*parts) / 2**63
