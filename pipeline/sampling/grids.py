"""Sigma grids in the VE frame: descending 1-D float64 tensors ending at 0.

- ``ddpm_timesteps`` / ``ddpm_sigmas``: a subset of a discrete process's timesteps, spaced as
  diffusers' "leading", "trailing" or "linspace", or DDIM's "quadratic" (Song et al. 2021,
  "DDIM", Appendix D.2), as sigma_ve;
- ``karras_sigmas``: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
  (Karras et al. 2022, "EDM", eq. 5);
- ``logsnr_sigmas``: uniform in log-SNR = -2 log sigma (Lu et al. 2022, "DPM-Solver", Sec. 3.3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SPACINGS", "ddpm_sigmas", "ddpm_timesteps", "karras_sigmas", "logsnr_sigmas"]


def _append_zero(s: Tensor) -> Tensor:
    return torch.cat([s, s.new_zeros(1)])


SPACINGS = ("leading", "trailing", "linspace", "quadratic")


def ddpm_timesteps(T: int, n: int, spacing: str = "leading") -> Tensor:
    """n distinct timesteps out of 0..T-1, descending; the first three as diffusers'
    ``timestep_spacing`` (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed", Table 2):

    - "leading": 0, c, 2c, ... with c = T // n (DDIM's linear skip); never visits t = T-1;
    - "trailing": round(T - i T/n) - 1 for i = 0..n-1, from T-1 down;
    - "linspace": round(linspace(0, T-1, n)), both ends;
    - "quadratic": floor((i sqrt(0.8 T)/(n-1))^2) (DDIM, Appendix D.2), raised to at least i so
      that the small timesteps, which the square crowds together, stay distinct.
    """
    if not 1 <= n <= T:
        raise ValueError(f"need 1 <= n <= T, got n={n}, T={T}")
    i = torch.arange(n, dtype=torch.float64)
    if spacing == "leading":
        t = i * (T // n)
    elif spacing == "trailing":
        delta = (T - T / n) - T  # the step np.arange uses (second value minus first), so ties round alike
        t = (T + i * delta).round().flip(0) - 1
    elif spacing == "linspace":
        t = i * ((T - 1) / max(n - 1, 1))  # np.linspace's arithmetic (ties round alike), last = T-1
        t[-1] = T - 1 if n > 1 else 0
        t = t.round()
    elif spacing == "quadratic":
        if n > int(0.8 * T) + 1:
            raise ValueError(f"quadratic spacing has at most floor(0.8 T) + 1 = {int(0.8 * T) + 1} steps, got n={n}")
        t = torch.maximum((torch.linspace(0, math.sqrt(0.8 * T), n, dtype=torch.float64) ** 2).floor(), i)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return t.long().flip(0)


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
