"""Posterior sampling for y = A x_0 + n, n ~ N(0, noise_std^2 I), as a denoiser wrapper.

grad_x log p(x | y) = grad_x log p(x) + grad_x log p(y | x) (Song et al. 2021, eq. 14), and with
D = x + sigma^2 grad log p (Tweedie) the conditional denoiser is D_y = D + sigma^2 grad_x log p(y | x).
p(y | x) = int p(y | x_0) p(x_0 | x) dx_0 is approximated by moment matching
p(x_0 | x) ~ N(D(x), C): p(y | x) ~ N(y; A D, noise_std^2 I + A C A^T), which gives

    D_y = D + sigma^2 J^T A^T u,   (noise_std^2 I + A C A^T) u = y - A D,   J = dD/dx,

with u from a few conjugate-gradient steps and the covariance held fixed when differentiating
(Song et al. 2023, "Pseudoinverse-guided diffusion models" (PiGDM), Sec. 3; Rozet et al. 2024,
"Learning diffusion priors from observations by expectation maximization" (MMPS), Sec. 4).
``covariance``:
- "jacobian": C = sigma^2 J, the exact posterior covariance (Tweedie's second moment, Meng et al.
  2021); then D_y is the exact conditional mean whenever p(x_0 | x) is Gaussian;
- "isotropic": C = sigma^2 v / (sigma^2 + v) I for data of variance ``data_var`` (PiGDM);
- "none": C = 0 (Chung et al. 2023, "DPS", without its step-size heuristic), needs noise_std > 0.
The wrapped denoiser works with every sampler, ODE or SDE. ``A`` must be linear and batch-wise
(a differentiable torch function of x_0 of shape (B, ...)).

Inpainting (known values under a mask) is the case A x = mask * x. When the denoiser accepts a
per-element sigma (networks trained with per-token noise levels, Chen et al. 2024, "Diffusion
Forcing"; the Gaussian-mixture oracle), ``inpainting(..., method="per_element_sigma")`` is exact:
the known entries enter clean, at sigma = 0, so D returns E[x_0 | x_unknown, x_0,known = y].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.sampling.frame import batch_sigma

__all__ = ["inpainting", "posterior_denoiser"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(1).reshape(-1, *([1] * (a.dim() - 1)))


def _conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int) -> Tensor:
    """Per-sample CG for M u = b with M symmetric positive (semi)definite on the range of b
    (Hestenes & Stiefel 1952); starts at 0 so iterates stay in the Krylov space of b."""
    u, r, p = torch.zeros_like(b), b, b
    rs = _dot(r, r)
    for _ in range(steps):
        mp = matvec(p)
        pmp = _dot(p, mp)
        alpha = torch.where(pmp > 0, rs / pmp.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        u, r = u + alpha * p, r - alpha * mp
        rs_next = _dot(r, r)
        p = r + torch.where(rs > 0, rs_next / rs.clamp_min(torch.finfo(b.dtype).tiny), 0.0) * p
        rs = rs_next
    return u


def posterior_denoiser(
    denoiser,
    A: Callable[[Tensor], Tensor],
    y: Tensor,
    noise_std: float = 0.0,
    covariance: str = "jacobian",
    cg_steps: int = 5,
    data_var: float = 1.0,
):
    """The conditional denoiser D_y(x, sigma) for y = A x_0 + n (see the module docstring)."""
    if covariance not in ("jacobian", "isotropic", "none"):
        raise ValueError(f"covariance must be jacobian, isotropic or none, got {covariance!r}")
    if covariance == "none" and noise_std <= 0:
        raise ValueError("covariance='none' needs noise_std > 0")

    def A_transpose(v: Tensor, like: Tensor) -> Tensor:
        with torch.enable_grad():
            z = torch.zeros_like(like, requires_grad=True)
            return torch.autograd.grad(A(z), z, v)[0]

    def conditional(x: Tensor, sigma) -> Tensor:
        s = batch_sigma(sigma, x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            d = denoiser(xg, s)

            def vjp(v: Tensor) -> Tensor:  # J^T v, J = dD/dx (symmetric for an exact denoiser)
                return torch.autograd.grad(d, xg, v, retain_graph=True)[0]

            d0 = d.detach()
            if covariance == "jacobian":
                cov = lambda w: s**2 * vjp(w)  # noqa: E731
            elif covariance == "isotropic":
                cov = lambda w: s**2 * data_var / (s**2 + data_var) * w  # noqa: E731
            else:
                cov = lambda w: torch.zeros_like(w)  # noqa: E731
            residual = y - A(d0)
            u = _conjugate_gradient(lambda v: noise_std**2 * v + A(cov(A_transpose(v, d0))), residual, cg_steps)
            return d0 + s**2 * vjp(A_transpose(u, d0))

    return conditional


def inpainting(denoiser, known: Tensor, mask: Tensor, method: str = "posterior", noise_std: float = 0.0, **options):
    """Condition on ``known`` where ``mask`` is 1 (pixels or latents).

    ``method="posterior"``: :func:`posterior_denoiser` with A x = mask * x (any denoiser;
    ``options`` go there). ``method="per_element_sigma"``: exact for denoisers that take a sigma
    of x's shape; D_y(x, sigma) = D(mask y + (1 - mask) x, (1 - mask) sigma) on the unknown
    entries and y on the known ones (noise-free observations only).
    """
    mask = mask.to(known.dtype)
    if method == "posterior":
        return posterior_denoiser(denoiser, lambda z: mask * z, mask * known, noise_std, **options)
    if method != "per_element_sigma":
        raise ValueError(f"method must be 'posterior' or 'per_element_sigma', got {method!r}")
    if noise_std or options:
        raise ValueError("per_element_sigma inpainting takes noise-free observations and no options")

    def conditional(x: Tensor, sigma) -> Tensor:
        s = batch_sigma(sigma, x)
        x_in = mask * known + (1 - mask) * x
        return mask * known + (1 - mask) * denoiser(x_in, (1 - mask) * s)

    return conditional
