"""Samplers: pure functions over the denoiser contract ``D(x, sigma) -> x0_hat`` (VE frame).

    x = pipeline.sampling.sample(denoiser, noise, sigmas, method="dpmpp_2m", generator=g)

``noise`` is already scaled to ``sigmas[0]``; ``sigmas`` is a 1-D descending tensor ending at 0
(see :mod:`pipeline.sampling.grids`); all randomness comes from ``generator`` (one, or a list
of one per sample so that samples do not depend on the batch); inputs are never
modified in place and the arithmetic runs in ``noise``'s dtype. Conditioning is bound into the
denoiser (``functools.partial(D, **cond)``, :mod:`~pipeline.sampling.guidance`,
:mod:`~pipeline.sampling.inverse`). ``METHODS`` maps each name to its solver
``solver(denoiser, x, sigmas, generator=None, **options)``; ``SOLVERS`` holds each method's
registry entry (its options, whether it is stochastic, :mod:`~pipeline.sampling.registry`).

Layering: this package never imports ``pipeline.diffusion`` (solvers see only the denoiser
contract); ``pipeline.diffusion`` imports from here. The VE-frame helpers both use live at the
bottom, in :mod:`~pipeline.sampling.frame`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.sampling.grids import ddpm_sigmas, ddpm_timesteps, karras_sigmas, logsnr_sigmas
from pipeline.sampling.registry import METHODS, SOLVERS, Solver
from pipeline.sampling.steps import check_grid

__all__ = ["METHODS", "SOLVERS", "Solver", "ddpm_sigmas", "ddpm_timesteps", "karras_sigmas", "logsnr_sigmas", "sample"]


def sample(
    denoiser,
    noise: Tensor,
    sigmas: Tensor,
    method: str = "heun",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    info: dict | None = None,
    **options,
) -> Tensor:
    """Run ``METHODS[method]`` from ``noise`` (at sigmas[0]) down to sigma = 0.

    ``info``, when given, receives "nfe" (number of denoiser calls) and any solver statistics
    (rk45: "steps", "rejected"). ``options`` go to the solver (e.g. eta=, churn=, rtol=).
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown sampling method {method!r}; choose from {sorted(SOLVERS)}")
    entry = SOLVERS[method]
    unknown = set(options) - set(entry.options)
    if unknown:
        raise ValueError(f"{method} takes the options {sorted(entry.options)}, not {sorted(unknown)}")
    sigmas = check_grid(sigmas, noise)
    calls = 0

    def counted(x, sigma):
        nonlocal calls
        calls += 1
        return denoiser(x, sigma)

    if info is not None and entry.reports:
        options["info"] = info
    out = entry.solver(counted, noise, sigmas, generator=generator, **options)
    if info is not None:
        info["nfe"] = calls
    return out
