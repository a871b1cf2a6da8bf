"""Step helpers shared by the solvers (one copy of each piece of arithmetic).

All solvers integrate in the VE frame x = x_0 + sigma eps with sigma as time, where the
probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma (EDM, Karras et al. 2022, eq. 4
with s(t) = 1, sigma(t) = t) and the reverse SDE is
dx = -2 sigma grad log p dsigma + sqrt(2 sigma) dw_bar (Song et al. 2021, eq. 6 with f = 0,
g^2 = d sigma^2 / dsigma). Any process maps onto these through x_ve = x_t / alpha_t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sampling.frame import batch_sigma, noise_like

__all__ = ["ancestral_split", "check_grid", "denoise", "noise_like", "ode_derivative"]


def denoise(denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    """One network evaluation with sigma broadcast to x's batch as a (B, 1, ..., 1) tensor."""
    return denoiser(x, batch_sigma(sigma, x))


def ode_derivative(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """dx/dsigma = (x - D) / sigma (EDM eq. 4; Algorithm 1 line 4)."""
    return (x - denoised) / sigma


def ancestral_split(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of the DDIM step with stochasticity eta (Song et al. 2021, "DDIM",
    eq. 16) in the VE frame: sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2,
    sigma_down^2 = sigma_next^2 - sigma_up^2. eta = 1 gives the DDPM posterior variance beta~."""
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
    up = torch.minimum(up, sigma_next)
    return (sigma_next**2 - up**2).sqrt(), up


def check_grid(sigmas: Tensor, noise: Tensor) -> Tensor:
    """The public API's grid contract: 1-D, strictly descending, ending at 0; as noise's dtype."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor with at least two entries")
    if sigmas[-1] != 0 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError("sigmas must be strictly descending and end at 0")
    return sigmas.to(dtype=noise.dtype, device=noise.device)
