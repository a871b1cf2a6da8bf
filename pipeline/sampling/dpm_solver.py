"""Multistep exponential-integrator solvers in the VE frame with lambda = -log sigma.

For x = x_0 + sigma eps the data-prediction form of the PF-ODE has the exact solution
x_next = (sigma_next/sigma) x + (1 - sigma_next/sigma) x0-term integrated in lambda (Lu et al. 2022,
"DPM-Solver++", eq. 9 with alpha = 1); the solvers below approximate D along lambda by
polynomials through previous evaluations, one network evaluation per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sampling.steps import denoise, noise_like


def dpmpp_2m(denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): with h = lambda_next - lambda and
    r = h_prev / h, D~ = (1 + 1/(2r)) D - 1/(2r) D_prev, x <- (sigma_next/sigma) x - (e^{-h} - 1) D~;
    first step D~ = D, and the step to sigma = 0 returns D."""
    denoised_prev, h_prev = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(denoiser, x, sigma)
        if sigma_next == 0:
            return denoised
        h = sigma.log() - sigma_next.log()
        d = denoised
        if denoised_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        denoised_prev, h_prev = denoised, h
    return x


def dpmpp_3m_sde(
    denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None, eta: float = 1.0
) -> Tensor:
    """Third-order multistep DPM-Solver++ with the SDE variant's noise (Lu et al. 2022, Sec. 4's
    multistep construction taken to order 3, as in Crowson's k-diffusion ``sample_dpmpp_3m_sde``):
    noise fraction ``eta`` (eta = 0: the deterministic 3M ODE solver). With
    h_eta = (1 + eta) h, x <- e^{-h_eta} x + (1 - e^{-h_eta}) D + phi_2 D1 - phi_3 D2
    + sigma_next sqrt(1 - e^{-2 eta h}) z, where D1, D2 are divided differences of past D."""
    last: tuple[Tensor, Tensor] | None = None  # (D, h) of the previous step
    before: tuple[Tensor, Tensor] | None = None  # (D, h) of the step before that
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(denoiser, x, sigma)
        if sigma_next == 0:
            return denoised
        h = sigma.log() - sigma_next.log()
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if last is not None and before is not None:
            (d1, h1), (d2, h2) = last, before
            r0, r1 = h1 / h, h2 / h
            d1_0 = (denoised - d1) / r0
            d1_1 = (d1 - d2) / r1
            x = x + phi_2 * (d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)) - (phi_2 / h_eta - 0.5) * (d1_0 - d1_1) / (r0 + r1)
        elif last is not None:
            d1, h1 = last
            x = x + phi_2 * (denoised - d1) / (h1 / h)
        if eta:
            x = x + sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * noise_like(x, generator)
        last, before = (denoised, h), last
    return x
