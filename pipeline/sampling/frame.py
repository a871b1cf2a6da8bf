"""The VE frame's two primitives, shared by the processes (pipeline.diffusion) and the solvers.

The bottom of the diffusion/sampling layering: this module imports only torch and
:mod:`pipeline.seeding`. ``pipeline.diffusion`` may import ``pipeline.sampling`` (its grids,
solvers and these helpers); ``pipeline.sampling`` never imports ``pipeline.diffusion``, since
solvers see only the denoiser contract D(x, sigma) and know nothing about processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline import seeding

__all__ = ["batch_sigma", "noise_like"]


def batch_sigma(sigma, x: Tensor) -> Tensor:
    """``sigma`` as a (B, 1, ..., 1) tensor in x's dtype/device (from a scalar, (B,) or (B, 1...))."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() > 0 and s.shape[0] == x.shape[0]:
        s = s.reshape(x.shape[0])
    return s.expand(x.shape[0]).reshape(x.shape[0], *([1] * (x.dim() - 1)))


def noise_like(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """Standard normal noise shaped like x, on x's device, drawn on each generator's own device.
    A sequence of generators, one per sample, draws each row from its own: the samples then do
    not depend on the batch they are rendered in."""
    if generator is None or isinstance(generator, torch.Generator):
        return seeding.randn(x.shape, generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: pass one per sample")
    return torch.stack([seeding.randn(x.shape[1:], g, device=x.device, dtype=x.dtype) for g in generator])
