"""Heun's method on the probability-flow ODE with optional churn (Karras et al. 2022, "EDM",
Algorithm 1, and Algorithm 2 for S_churn > 0)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.sampling.steps import denoise, noise_like, ode_derivative


def heun(
    denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    churn: float = 0.0,
    churn_min: float = 0.0,
    churn_max: float = float("inf"),
    churn_noise: float = 1.0,
) -> Tensor:
    """EDM Algorithm 2 (= Algorithm 1 when ``churn`` = 0). ``churn`` = S_churn, the range
    [``churn_min``, ``churn_max``] = [S_tmin, S_tmax] and ``churn_noise`` = S_noise.

    Works on any monotone grid: ascending grids run the ODE forwards (used by ``encode``); a
    step to sigma = 0 is a plain Euler step (Algorithm 1, line 9), which returns D.
    """
    n = len(sigmas) - 1
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(churn / n, math.sqrt(2) - 1) if churn_min <= sigma <= churn_max else 0.0
        if gamma > 0:
            sigma_hat = sigma * (1 + gamma)
            x = x + (sigma_hat**2 - sigma**2).sqrt() * churn_noise * noise_like(x, generator)
            sigma = sigma_hat
        d = ode_derivative(x, denoise(denoiser, x, sigma), sigma)
        x_next = x + (sigma_next - sigma) * d
        if sigma_next != 0:
            d_next = ode_derivative(x_next, denoise(denoiser, x_next, sigma_next), sigma_next)
            x_next = x + (sigma_next - sigma) * 0.5 * (d + d_next)
        x = x_next
    return x
