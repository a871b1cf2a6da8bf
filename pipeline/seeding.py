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


def _drawn_then_moved(draw, shape, generator, device, dtype, **kwargs) -> torch.Tensor:
    # A generator only draws onto its own device (CUDA refuses a CPU generator): draw there,
    # then move. The numbers then depend on (seed, shape) alone, not on where they are used.
    home = generator.device if generator is not None else device
    return draw(*shape, generator=generator, device=home, dtype=dtype, **kwargs).to(device, non_blocking=True)


def randn(
    shape, generator: torch.Generator | None, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Standard normal draws of ``shape`` from ``generator``, returned on ``device``."""
    return _drawn_then_moved(torch.randn, tuple(shape), generator, device, dtype)


def rand(
    shape, generator: torch.Generator | None, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` from ``generator``, returned on ``device``."""
    return _drawn_then_moved(torch.rand, tuple(shape), generator, device, dtype)


def randint(high: int, shape, generator: torch.Generator | None, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """Integers in [0, high) of ``shape`` from ``generator``, returned on ``device``."""
    home = generator.device if generator is not None else device
    return torch.randint(high, tuple(shape), generator=generator, device=home).to(device, non_blocking=True)


def randperm(n: int, generator: torch.Generator | None, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """A random permutation of range(n) from ``generator``, returned on ``device``."""
    home = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=home).to(device, non_blocking=True)


def multinomial(
    weights: torch.Tensor, n: int, generator: torch.Generator | None, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """n indices drawn with replacement with probabilities proportional to ``weights``."""
    home = generator.device if generator is not None else device
    return torch.multinomial(weights.to(home), n, replacement=True, generator=generator).to(device, non_blocking=True)
