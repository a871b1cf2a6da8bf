"""Stochastic samplers of the reverse-time SDE in the VE frame, sigma as time.

Reverse SDE (Anderson 1982; Song et al. 2021, eq. 6) of dx = sqrt(2 sigma) dw (f = 0,
g^2 = d sigma^2/dsigma): dx = -2 sigma grad log p_sigma(x) dsigma + sqrt(2 sigma) dw_bar with
grad log p_sigma(x) = (D - x)/sigma^2. Every step below has the form x + a (D - x) + b z; a
step to sigma = 0 is the denoising jump x <- D (Jolicoeur-Martineau et al. 2021, "Adversarial
score matching and improved sampling", Sec. 4; the last step of Song et al. 2021's samplers).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sampling.steps import denoise, noise_like


def _pull(x: Tensor, denoised: Tensor, a, b, z: Tensor) -> Tensor:
    """x + a (D - x) + b z."""
    return x + a * (denoised - x) + b * z


def _euler_maruyama_coefs(sigma, sigma_next):
    # dx = 2 (x - D)/sigma dsigma + sqrt(2 sigma |dsigma|) z (Kloeden & Platen 1992, Sec. 9.1).
    return 2 * (sigma - sigma_next) / sigma, (2 * sigma * (sigma - sigma_next)).sqrt()


def _reverse_diffusion_coefs(sigma, sigma_next):
    # Song et al. 2021, Appendix E, reverse-diffusion predictor (VE):
    # x + (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) z.
    return (sigma**2 - sigma_next**2) / sigma**2, (sigma**2 - sigma_next**2).sqrt()


_PREDICTORS = {"euler_maruyama": _euler_maruyama_coefs, "reverse_diffusion": _reverse_diffusion_coefs}


def _predict(denoiser, x, sigma, sigma_next, coefs, generator) -> Tensor:
    denoised = denoise(denoiser, x, sigma)
    if sigma_next == 0:
        return denoised
    a, b = coefs(sigma, sigma_next)
    return _pull(x, denoised, a, b, noise_like(x, generator))


def euler_maruyama(denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = _predict(denoiser, x, sigma, sigma_next, _euler_maruyama_coefs, generator)
    return x


def _langevin_step(x: Tensor, denoised: Tensor, sigma, step, z: Tensor) -> Tensor:
    """x + step grad log p + sqrt(2 step) z with grad log p = (D - x)/sigma^2."""
    return _pull(x, denoised, step / sigma**2, (2 * step).sqrt(), z)


def pc(
    denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    predictor: str = "reverse_diffusion",
    corrector_steps: int = 1,
    snr: float = 0.16,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 2 for VE; corrector Algorithm 4):
    for each step a ``predictor`` step sigma -> sigma_next ("reverse_diffusion" or
    "euler_maruyama"), then, at sigma_next > 0, ``corrector_steps`` Langevin steps
    x <- x + eps grad log p + sqrt(2 eps) z.

    Algorithm 4's step eps = 2 (snr ||z|| / ||grad log p||)^2 is taken with both norms at their
    noise-dominated expectations, E||z||^2 = d and E||grad log p_sigma||^2 = d / sigma^2, so
    eps = 2 (snr sigma)^2 depends on sigma alone and a sample does not depend on its batch. The
    reference implementation averages the norms over the batch (a sample then changes with its
    batch: by 0.34 on the 2-D mixture oracle); per-sample norms are heavy-tailed in low dimension
    (||grad log p|| near 0 at a mode gives unbounded steps: error 0.34 vs 0.02 there)."""
    coefs = _PREDICTORS[predictor]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = _predict(denoiser, x, sigma, sigma_next, coefs, generator)
        if sigma_next == 0:
            break
        for _ in range(corrector_steps):
            step = 2 * (snr * sigma_next) ** 2
            x = _langevin_step(x, denoise(denoiser, x, sigma_next), sigma_next, step, noise_like(x, generator))
    return x


def langevin(
    denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    steps_per_level: int = 100,
    step_ratio: float = 0.2,
) -> Tensor:
    """NCSN annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): for each positive level
    from the largest down, K = ``steps_per_level`` steps x <- x + eps_i grad log p_sigma_i(x)
    + sqrt(2 eps_i) z with eps_i = ``step_ratio`` sigma_i^2 (their eps sigma_i^2/sigma_L^2 with
    eps = step_ratio sigma_L^2); the final entry 0 of the grid is the denoising jump.

    The defaults are the paper's: T = 100 steps per level and eps = 2e-5 at sigma_L = 0.01, i.e.
    step_ratio 0.2. With them 19 levels (1,901 evaluations) reach the finite-sample noise floor
    of the 2-D mixture oracle; the former defaults (10 steps, ratio 0.05) ended 25x above it on
    20 levels and needed ~200 levels to reach it."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        step = step_ratio * sigma**2
        for _ in range(steps_per_level):
            x = _langevin_step(x, denoise(denoiser, x, sigma), sigma, step, noise_like(x, generator))
        if sigma_next == 0:
            x = denoise(denoiser, x, sigma)
    return x
