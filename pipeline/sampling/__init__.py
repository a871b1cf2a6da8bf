"""Samplers: pure functions over the denoiser contract ``D(x, sigma) -> x0_hat`` (VE frame).

    x = pipeline.sampling.sample(denoiser, noise, sigmas, method="dpmpp_2m", generator=g)

``noise`` is already scaled to ``sigmas[0]``; ``sigmas`` is a 1-D descending tensor ending at 0
(see :mod:`pipeline.sampling.grids`); all randomness comes from ``generator`` (one, or a list
of one per sample so that samples do not depend on the batch); inputs are never
modified in place and the arithmetic runs in ``noise``'s dtype. Conditioning is bound into the
denoiser (``functools.partial(D, **cond)``, :mod:`~pipeline.sampling.guidance`,
:mod:`~pipeline.sampling.inverse`). ``METHODS`` maps each name to its solver
``solver(denoiser, x, sigmas, generator=None, **options)``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from pipeline.sampling.adaptive import rk45
from pipeline.sampling.ancestral import ddim, ddpm, euler
from pipeline.sampling.dpm_solver import dpmpp_2m, dpmpp_3m_sde
from pipeline.sampling.edm import heun
from pipeline.sampling.grids import ddpm_sigmas, ddpm_timesteps, karras_sigmas, logsnr_sigmas
from pipeline.sampling.ipndm import ipndm
from pipeline.sampling.sde import euler_maruyama, langevin, pc
from pipeline.sampling.steps import check_grid
from pipeline.sampling.unipc import unipc

__all__ = ["METHODS", "sample", "ddpm_sigmas", "ddpm_timesteps", "karras_sigmas", "logsnr_sigmas"]

METHODS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "rk45": rk45,
    "euler_maruyama": euler_maruyama,
    "pc": pc,
    "langevin": langevin,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "unipc": unipc,
    "ipndm": ipndm,
}


def sample(denoiser, noise: Tensor, sigmas: Tensor, method: str = "heun",
           generator: torch.Generator | None = None, info: dict | None = None, **options) -> Tensor:
    """Run ``METHODS[method]`` from ``noise`` (at sigmas[0]) down to sigma = 0.

    ``info``, when given, receives "nfe" (number of denoiser calls) and any solver statistics
    (rk45: "steps", "rejected"). ``options`` go to the solver (e.g. eta=, churn=, rtol=).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose from {sorted(METHODS)}")
    solver = METHODS[method]
    sigmas = check_grid(sigmas, noise)
    calls = 0

    def counted(x, sigma):
        nonlocal calls
        calls += 1
        return denoiser(x, sigma)

    if info is not None and "info" in inspect.signature(solver).parameters:
        options["info"] = info
    out = solver(counted, noise, sigmas, generator=generator, **options)
    if info is not None:
        info["nfe"] = calls
    return out
