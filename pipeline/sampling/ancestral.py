"""The one first-order loop: Euler on the probability-flow ODE, DDIM(eta) and DDPM ancestral.

Each step is x <- x + (sigma_down - sigma) (x - D)/sigma + sigma_up z: an Euler step of
dx/dsigma = (x - D)/sigma to sigma_down followed by fresh noise of std sigma_up. In the VE
frame DDIM's update x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - s_t^2) eps_hat + s_t z
(Song et al. 2021, "DDIM", eq. 12) is exactly this step with (sigma_down, sigma_up) from
:func:`~pipeline.sampling.steps.ancestral_split`; with eta = 0 the split is (sigma_next, 0),
i.e. DDIM IS Euler on the PF-ODE (Karras et al. 2022, "EDM", Sec. 3 / Appendix B.5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.sampling.steps import ancestral_split, denoise, noise_like, ode_derivative

Split = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _first_order(denoiser, x: Tensor, sigmas: Tensor, split: Split, generator) -> Tensor:
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(denoiser, x, sigma)
        sigma_down, sigma_up = split(sigma, sigma_next)
        x = x + ode_derivative(x, denoised, sigma) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + sigma_up * noise_like(x, generator)
    return x


def ddim(denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 and eq. 16 for the eta-scaled variance), eta in [0, 1]."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta == 0:
        return _first_order(denoiser, x, sigmas, lambda s, s_next: (s_next, s_next * 0), generator)
    return _first_order(denoiser, x, sigmas, lambda s, s_next: ancestral_split(s, s_next, eta), generator)


def euler(denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Euler on the PF-ODE dx/dsigma = (x - D)/sigma (EDM eq. 4): the eta = 0 DDIM loop."""
    return ddim(denoiser, x, sigmas, generator, eta=0.0)


def _beta_split(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    # Mean mu~_t (Ho et al. 2020, eq. 7) is the eta = 1 DDIM mean; the noise has variance
    # beta_t = 1 - abar_t/abar_{t-1} instead of beta~_t, i.e. in the VE frame of a VP process
    # sigma_up^2 = beta_t / abar_{t-1} = (sigma^2 - sigma_next^2)(1 + sigma_next^2)/(1 + sigma^2);
    # the last step adds no noise (Ho et al. Algorithm 2, z = 0 if t = 1).
    sigma_down, _ = ancestral_split(sigma, sigma_next, 1.0)
    if sigma_next == 0:
        return sigma_down, sigma_next
    return sigma_down, ((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)).sqrt()


def ddpm(
    denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None, variance: str = "posterior"
) -> Tensor:
    """Ancestral sampling x_{t-1} ~ p_theta(x_{t-1} | x_t) = N(mu~_t, sigma_t^2 I) (Ho et al. 2020,
    Algorithm 2) with sigma_t^2 = beta~_t (``variance="posterior"``, = DDIM eta = 1) or beta_t
    (``variance="beta"``; assumes a variance-preserving process, as DDPM is)."""
    if variance == "posterior":
        return ddim(denoiser, x, sigmas, generator, eta=1.0)
    if variance == "beta":
        return _first_order(denoiser, x, sigmas, _beta_split, generator)
    raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
