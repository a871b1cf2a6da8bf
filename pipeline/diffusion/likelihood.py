"""Exact likelihood through the probability-flow ODE, and encode/decode along it.

In u = log sigma the PF-ODE of the VE frame is dx/du = x - D(x, e^u) (EDM eq. 4 times sigma).
The instantaneous change of variables (Chen et al. 2018, Theorem 1; Song et al. 2021, Appendix D.2)
gives log p_{sigma_min}(x) = log p_{sigma_max}(x(u_max)) + int_{u_min}^{u_max} tr(d f/dx) du with
tr(d f/dx) = d - tr(dD/dx); tr(dD/dx) ~ v^T (dD/dx) v for fixed Rademacher or Gaussian v
(Hutchinson 1990; Skilling 1989; Grathwohl et al. 2019, "FFJORD"). The ODE runs with the adaptive
Dormand-Prince solver of :mod:`pipeline.sampling.adaptive`. The prior is N(0, sigma_max^2 I) unless one is
passed (its error is O(|x_0| / sigma_max)).

``encode`` runs the same ODE forwards (data -> noise latent, deterministic) and ``decode`` runs
it back; decode(encode(x)) = x up to the solver error, so latents can be interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pipeline import seeding
from pipeline.sampling.adaptive import dopri5, log_sigma_ode
from pipeline.sampling.edm import heun
from pipeline.sampling.frame import batch_sigma
from pipeline.sampling.grids import logsnr_sigmas

__all__ = ["bits_per_dim", "decode", "encode", "log_likelihood"]


def _gaussian_prior(z: Tensor, sigma: float) -> Tensor:
    d = z[0].numel()
    return -0.5 * (z.reshape(z.shape[0], -1).pow(2).sum(1) / sigma**2 + d * math.log(2 * math.pi * sigma**2))


def log_likelihood(
    denoiser,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator | None = None,
    probes: int = 1,
    estimator: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    prior: Callable[[Tensor], Tensor] | None = None,
    info: dict | None = None,
) -> Tensor:
    """log p_{sigma_min}(x) per sample, in nats. ``estimator``: "rademacher" or "gaussian"
    Hutchinson probes (``probes`` of them, fixed along the trajectory), or "exact" (d VJPs).
    ``prior(z)``: log p_{sigma_max}(z) per sample, N(0, sigma_max^2 I) by default. ``info``
    receives the solver's "nfe", "steps" and "rejected"."""
    B, d = x.shape[0], x[0].numel()
    if estimator == "exact":
        v = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
        weight = 1.0
    else:
        v = seeding.randn((probes, *x.shape), generator, device=x.device, dtype=x.dtype)
        if estimator == "rademacher":
            v = v.sign()
        elif estimator != "gaussian":
            raise ValueError(f"estimator must be rademacher, gaussian or exact, got {estimator!r}")
        weight = 1.0 / probes

    def f(u: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = y[:, :d].reshape(x.shape).detach().requires_grad_(True)
            den = denoiser(xg, batch_sigma(u.exp(), xg))
            trace = (
                sum((torch.autograd.grad(den, xg, vi, retain_graph=True)[0] * vi).reshape(B, -1).sum(1) for vi in v)
                * weight
            )
        return torch.cat([(xg - den).detach().reshape(B, -1), (d - trace).detach()[:, None]], 1)

    y0 = torch.cat([x.reshape(B, -1), x.new_zeros(B, 1)], 1)
    y1, stats = dopri5(f, y0, math.log(sigma_min), math.log(sigma_max), rtol=rtol, atol=atol)
    if info is not None:
        info.update(stats)
    z = y1[:, :d].reshape(x.shape)
    return (prior(z) if prior is not None else _gaussian_prior(z, sigma_max)) + y1[:, d]


def bits_per_dim(
    denoiser, images: Tensor, sigma_min: float, sigma_max: float, generator: torch.Generator | None = None, **options
) -> Tensor:
    """Bits/dim of 8-bit data (integers 0..255) under the model on [-1, 1] with uniform
    dequantisation x = 2 (images + u)/256 - 1, u ~ U[0, 1) (Theis et al. 2016; Ho et al. 2020,
    Sec. 4): -log2 P(images) <= -(log p(x) + d log(2/256)) / ln 2, i.e. +7 bits per dimension."""
    u = seeding.rand(images.shape, generator, device=images.device, dtype=torch.float64)
    x = (2 * (images.to(torch.float64) + u) / 256 - 1).to(options.pop("dtype", torch.float64))
    logp = log_likelihood(denoiser, x, sigma_min, sigma_max, generator=generator, **options)
    d = images[0].numel()
    return -(logp + d * math.log(2 / 256)) / (d * math.log(2))


def _flow(
    denoiser, x: Tensor, sigma_from: float, sigma_to: float, steps: int | None, rtol: float, atol: float
) -> Tensor:
    if steps is None:
        y, _ = dopri5(
            log_sigma_ode(denoiser, x.shape),
            x.reshape(x.shape[0], -1),
            math.log(sigma_from),
            math.log(sigma_to),
            rtol=rtol,
            atol=atol,
        )
        return y.reshape(x.shape)
    grid = logsnr_sigmas(min(sigma_from, sigma_to), max(sigma_from, sigma_to), steps + 1)[:-1].to(x.dtype)
    return heun(denoiser, x, grid if sigma_from > sigma_to else grid.flip(0))


def encode(
    denoiser,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Tensor:
    """Data at sigma_min -> its latent at sigma_max along the PF-ODE: Heun on ``steps`` log-uniform
    steps (EDM Algorithm 1) or, with ``steps=None``, adaptive Dormand-Prince."""
    return _flow(denoiser, x, sigma_min, sigma_max, steps, rtol, atol)


def decode(
    denoiser,
    z: Tensor,
    sigma_min: float,
    sigma_max: float,
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Tensor:
    """The inverse of :func:`encode`: latent at sigma_max -> x at sigma_min (no final denoising)."""
    return _flow(denoiser, z, sigma_max, sigma_min, steps, rtol, atol)
