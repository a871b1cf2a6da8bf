"""Improved PNDM (iPNDM): Adams-Bashforth on the probability-flow ODE dx/dsigma = (x - D)/sigma.

Zhang & Chen 2023 ("DEIS", Sec. 4 / Appendix: iPNDM replaces PNDM's Runge-Kutta warm-up by
lower-order multistep steps) as the diff-sampler benchmark (Zhou et al. 2024, "Fast ODE-based
sampling for diffusion models in around 5 steps", ``ipndm_sampler``) runs it: step i uses the
derivatives d_i, d_{i-1}, ... of the last min(i + 1, max_order) evaluations with the fixed
Adams-Bashforth weights of orders 1-4 (Liu et al. 2022, "PNDM", eq. 12 for order 4), whatever the
spacing of the grid. The step to sigma = 0 is the denoising jump x <- D (the Euler step to 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sampling.steps import denoise, ode_derivative

# Adams-Bashforth weights of d_i, d_{i-1}, ... for orders 1..4.
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm(denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None, max_order: int = 4) -> Tensor:
    """iPNDM with multistep order up to ``max_order`` (1..4; 1 is Euler)."""
    if not 1 <= max_order <= len(ADAMS_BASHFORTH):
        raise ValueError(f"max_order must be in 1..{len(ADAMS_BASHFORTH)}, got {max_order}")
    derivatives: list[Tensor] = []  # most recent first
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(denoiser, x, sigma)
        if sigma_next == 0:
            return denoised
        derivatives = [ode_derivative(x, denoised, sigma), *derivatives[: max_order - 1]]
        slope = sum(w * d for w, d in zip(ADAMS_BASHFORTH[len(derivatives) - 1], derivatives))
        x = x + (sigma_next - sigma) * slope
    return x
