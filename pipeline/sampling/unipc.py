"""UniPC with B(h) = e^h - 1 ("bh2"), data prediction, in the VE frame with lambda = -log sigma.

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", Sec. 3 (UniC, UniP) with the data-prediction update of their Appendix, as diffusers'
``UniPCMultistepScheduler(predict_x0=True, solver_type="bh2")`` runs it. With h = lambda_next -
lambda, previous denoiser outputs D_k at lambda_k, r_k = (lambda_k - lambda) / h and
D1_k = (D_k - D) / r_k, one step of order p is

    x_next = (sigma_next / sigma) x - (e^{-h} - 1) (D + sum_k rho_k D1_k)

(the VP frame's alpha factors cancel in x = x_t / alpha_t). rho solves the order conditions
sum_k rho_k r_k^{j-1} = j! phi_{j+1}(-h) / B(h), j = 1..m, with h phi_1(-h) = e^{-h} - 1 and
h phi_{j+1} = phi_j / (-h) - 1/j! recursively (Zhao et al., Sec. 3.1-3.2, with B(h) = e^{-h} - 1
in this sign convention). UniP (the predictor) uses the p - 1 previous points; UniC (the corrector)
re-solves with the new evaluation D(x_next) as an extra point at r = 1 and replaces x_next before
the next predictor step, so the corrector costs no extra evaluation. The order is lowered for the
first (warm-up) and last steps as in diffusers (``lower_order_final``); the step to sigma = 0 is
the denoising jump x <- D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.sampling.steps import denoise


def _rhos(h: Tensor, rks: list[Tensor]) -> Tensor:
    """rho of the order conditions for the points r_1..r_m; m = 1 uses the paper's simplified
    rho = 1/2 (diffusers: UniP-2 and UniC-1)."""
    if len(rks) == 1:
        return h.new_full((1,), 0.5)
    hh = -h
    b_h = torch.expm1(hh)
    h_phi = b_h / hh - 1
    b = []
    for j in range(1, len(rks) + 1):
        b.append(h_phi * math.factorial(j) / b_h)
        h_phi = h_phi / hh - 1 / math.factorial(j + 1)
    r = torch.stack(rks)
    vandermonde = torch.stack([r**j for j in range(len(rks))])
    return torch.linalg.solve(vandermonde, torch.stack(b))


def _bh2_step(
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    denoised: Tensor,
    previous: list[tuple[Tensor, Tensor]],
    new: Tensor | None,
) -> Tensor:
    """One UniP (``new`` None) or UniC (``new`` = D at sigma_next) step from (x, sigma) to
    sigma_next; ``previous`` holds (sigma_k, D_k) of earlier points, most recent first."""
    h = sigma.log() - sigma_next.log()
    rks = [(sigma.log() - s_k.log()) / h for s_k, _ in previous]
    diffs = [(d_k - denoised) / r for (_, d_k), r in zip(previous, rks)]
    if new is not None:
        rks.append(torch.ones_like(h))
        diffs.append(new - denoised)
    correction = sum((rho * d for rho, d in zip(_rhos(h, rks), diffs)), torch.zeros_like(x)) if diffs else 0
    return (sigma_next / sigma) * x - torch.expm1(-h) * (denoised + correction)


def unipc(
    denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    order: int = 2,
    corrector: bool = True,
) -> Tensor:
    """UniPC-``order`` (bh2, data prediction); ``corrector=False`` runs UniP alone."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    n = len(sigmas) - 1
    history: list[tuple[Tensor, Tensor]] = []  # (sigma_k, D_k), most recent first
    x_last, last_order = None, 0
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoise(denoiser, x, sigma)
        if corrector and x_last is not None:  # UniC-p re-solves the step that produced x
            sigma_last, d_last = history[0]
            x = _bh2_step(x_last, sigma_last, sigma, d_last, history[1:last_order], denoised)
        history = [(sigma, denoised), *history[: order - 1]]
        if sigma_next == 0:
            return denoised
        last_order = min(order, n - i, len(history))
        x_last = x
        x = _bh2_step(x, sigma, sigma_next, denoised, history[1:last_order], None)
    return x
