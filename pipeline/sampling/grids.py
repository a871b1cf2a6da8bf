"""Sigma grids in the VE frame: descending 1-D float64 tensors ending at 0.

- ``ddpm_timesteps`` / ``ddpm_sigmas``: a subset of a discrete process's timesteps with DDIM's
  uniform or quadratic spacing (Song et al. 2021, "DDIM", Appendix D.2), as sigma_ve;
- ``karras_sigmas``: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
  (Karras et al. 2022, "EDM", eq. 5);
- ``logsnr_sigmas``: uniform in log-SNR = -2 log sigma (Lu et al. 2022, "DPM-Solver", Sec. 3.3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ddpm_timesteps", "ddpm_sigmas", "karras_sigmas", "logsnr_sigmas"]


def _append_zero(s: Tensor) -> Tensor:
    return torch.cat([s, s.new_zeros(1)])


def ddpm_timesteps(T: int, n: int, spacing: str = "uniform") -> Tensor:
    """n timesteps out of 0..T-1, descending. ``uniform``: 0, c, 2c, ... with c = T // n (DDIM's
    linear skip, diffusers' "leading"); ``quadratic``: floor((i * sqrt(0.8 T)/(n-1))^2) (DDIM D.2)."""
    if not 1 <= n <= T:
        raise ValueError(f"need 1 <= n <= T, got n={n}, T={T}")
    if spacing == "uniform":
        t = torch.arange(n) * (T // n)
    elif spacing == "quadratic":
        t = (torch.linspace(0, math.sqrt(0.8 * T), n, dtype=torch.float64) ** 2).long()
        if len(set(t.tolist())) != n:
            raise ValueError(f"quadratic spacing repeats timesteps for n={n}, T={T}")
    else:
        raise ValueError(f"spacing must be 'uniform' or 'quadratic', got {spacing!r}")
    return t.flip(0)


def ddpm_sigmas(process, timesteps: Tensor) -> Tensor:
    """sigma_ve of the given (descending) timesteps of a discrete process, then 0."""
    return _append_zero(process.sigma_ve(timesteps))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """n levels from sigma_max to sigma_min, EDM eq. 5, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def logsnr_sigmas(sigma_min: float, sigma_max: float, n: int) -> Tensor:
    """n levels uniform in log sigma (= uniform in log-SNR) from sigma_max to sigma_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())
