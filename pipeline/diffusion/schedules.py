"""Forward noising processes and their view in the variance-exploding (VE) frame.

Every process noises data as x_t = alpha_t x_0 + sigma_t eps. Samplers work in the VE frame
x = x_t / alpha_t = x_0 + sigma * eps with sigma = sigma_t / alpha_t (Karras et al. 2022, "EDM",
eq. 4 and Table 1), so each process provides:

- ``marginal(t)``        -> (alpha_t, sigma_t) of q(x_t | x_0);
- ``sigma_ve(t)`` / ``t_of_sigma(sigma)``: the VE noise level of a time and back;
- ``input_scale(sigma)`` -> what the network's input is scaled by (it sees input_scale * x):
  alpha_t for DDPM, VP and sub-VP (their own x_t); for VE and NCSN, whose x_t = x reaches
  sigma_max = 50, 1 / sqrt(1 + sigma^2), EDM's c_in with sigma_data = 1 (the latents are
  normalised to unit variance; Karras et al. 2022, eq. 7 and Table 1), so every network sees
  unit-variance input. With ``prediction: v`` this is EDM's preconditioning: D = c_skip x +
  c_out F with c_skip = 1 / (1 + sigma^2), c_out = sigma / sqrt(1 + sigma^2) (F = -v);
- ``network_time(sigma)`` -> the time input of the network, shared by training and sampling:
  DDPM's integer timestep (0..T-1); for VP and sub-VP 999 t (score_sde's ``labels = t * 999``);
  for VE and NCSN log sigma mapped affinely onto [0, 999] (= 999 t for the VE-SDE, whose t is
  normalised log sigma). All land on the 0..999 range the sinusoidal embedding was built for
  (DDPM's T = 1000 timesteps): raw t in [1e-5, 1] would move the embedding by 0.03 while sigma
  changes 45x. VE and NCSN share the scale so that their networks see the same input at the
  same sigma. (EDM's c_noise = ln(sigma) / 4 serves its own Fourier embedding, not this one.)
- ``training_sigmas(n, generator, device)``: noise levels drawn for training;
- ``sigmas(n)``: the process's own sampling grid (descending, ending at 0);
- ``sde(t)`` -> (f_t, g_t) of dx = f_t x dt + g_t dw for the SDE processes (Song et al. 2021,
  "Score-based generative modeling through SDEs", eqs. 9-12 and Appendix B).

Times are float64 tensors internally; results follow the dtype of the caller's tensor, and
tables (DDPM's betas, NCSN's levels) follow the device of the index or sigma they are read with.
Every class satisfies :class:`pipeline.diffusion.process.Process`.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from pipeline import seeding
from pipeline.sampling.frame import batch_sigma
from pipeline.sampling.grids import ddpm_sigmas, ddpm_timesteps

__all__ = ["DDPM", "NCSN", "NETWORK_TIME_SCALE", "VE", "VP", "SubVP"]

NETWORK_TIME_SCALE = 999.0
"""Continuous network times span [0, 999], the integer range of DDPM's T = 1000 timesteps that
the networks' sinusoidal time embedding is built for (score_sde feeds VP/sub-VP nets 999 t)."""


def _as_f64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _like(value: Tensor, ref) -> Tensor:
    """``value`` in the dtype/device of ``ref`` (float64 when ``ref`` is not a float tensor)."""
    if isinstance(ref, Tensor) and ref.is_floating_point():
        return value.to(dtype=ref.dtype, device=ref.device)
    return value


def _take(table: Tensor, index) -> Tensor:
    """``table[index]`` on the index's device (a CUDA index cannot read a CPU table)."""
    index = torch.as_tensor(index)
    return table.to(index.device)[index]


def _nearest_index(table: Tensor, sigma) -> Tensor:
    """Index of the entry of an increasing positive ``table`` nearest to ``sigma`` in log space,
    on sigma's device."""
    s = _as_f64(sigma).clamp_min(1e-30).log()
    log_table = table.to(s.device).log()
    hi = torch.searchsorted(log_table, s).clamp(1, len(table) - 1)
    closer_to_lo = (s - log_table[hi - 1]) < (log_table[hi] - s)
    return torch.where(closer_to_lo, hi - 1, hi)


def _vp_scale(sigma: Tensor) -> Tensor:
    """alpha = 1 / sqrt(1 + sigma^2): variance preservation alpha^2 + sigma_t^2 = 1 in the VE frame."""
    return torch.rsqrt(1 + sigma * sigma)


class DDPM:
    """Discrete DDPM (Ho et al. 2020): q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

    Index ``t`` runs 0..T-1 as in diffusers (the paper's t = index + 1). ``alphas`` = 1 - beta,
    ``alphas_cumprod`` = alphabar_t = prod_{i <= t} alpha_i.
    """

    t_min = 0

    def __init__(self, betas):
        self.betas = _as_f64(betas)
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("DDPM betas must lie in (0, 1)")
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.T = len(self.betas)
        self.t_max = self.T - 1
        # sigma_ve of every timestep, increasing: sqrt((1 - alphabar) / alphabar).
        self.sigma_table = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DDPM:
        """Linear betas from ``beta_start`` to ``beta_end`` at T = 1000 (Ho et al. 2020, Sec. 4: 1e-4
        to 0.02), both ends scaled by 1000 / T for other T (Nichol & Dhariwal 2021, "iDDPM",
        ``get_named_beta_schedule``), so that alphabar_{T-1} ~ e^{-10} (4e-5) whatever T is;
        unscaled, T = 100 would end at alphabar 0.36, far from the N(0, I) samplers start from."""
        scale = 1000 / T
        return cls(torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DDPM:
        """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): alphabar(t) = f(t)/f(0),
        f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), beta_t = 1 - alphabar_t/alphabar_{t-1} <= 0.999."""
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return cls((1 - f[1:] / f[:-1]).clamp(max=max_beta))

    # -- marginals and posteriors --------------------------------------------------------
    def marginal(self, t) -> tuple[Tensor, Tensor]:
        """q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I) (Ho et al. eq. 4)."""
        ab = _take(self.alphas_cumprod, t)
        return ab.sqrt(), (1 - ab).sqrt()

    def step(self, x_prev: Tensor, t, noise: Tensor) -> Tensor:
        """One forward step x_t ~ q(x_t | x_{t-1}) (Ho et al. eq. 2) with the given noise; ``t`` is
        one timestep or one per sample."""
        b = batch_sigma(_take(self.betas, t), x_prev)
        return (1 - b).sqrt() * x_prev + b.sqrt() * noise

    def _alphas_cumprod_prev(self, t: Tensor) -> Tensor:
        """alphabar_{t-1}, with alphabar_{-1} = 1."""
        return torch.where(t > 0, _take(self.alphas_cumprod, (t - 1).clamp_min(0)), 1.0)

    def posterior_variance(self, t) -> Tensor:
        """beta~_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t (Ho et al. eq. 7)."""
        t = torch.as_tensor(t)
        return (1 - self._alphas_cumprod_prev(t)) / (1 - _take(self.alphas_cumprod, t)) * _take(self.betas, t)

    def posterior_mean(self, t, x_t: Tensor, x0: Tensor) -> Tensor:
        """mu~_t = sqrt(alphabar_{t-1}) beta_t/(1 - alphabar_t) x_0
        + sqrt(alpha_t)(1 - alphabar_{t-1})/(1 - alphabar_t) x_t (Ho et al. eq. 7)."""
        t = torch.as_tensor(t)
        ab, ab_prev = _take(self.alphas_cumprod, t), self._alphas_cumprod_prev(t)
        c0 = _like(ab_prev.sqrt() * _take(self.betas, t) / (1 - ab), x_t)
        ct = _like(_take(self.alphas, t).sqrt() * (1 - ab_prev) / (1 - ab), x_t)
        return c0 * x0 + ct * x_t

    def posterior_mean_from_eps(self, t, x_t: Tensor, eps: Tensor) -> Tensor:
        """mu~_t = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1 - alphabar_t) eps) (Ho et al. eq. 11)."""
        a = _like(_take(self.alphas, t), x_t)
        c = _like(_take(self.betas, t) / (1 - _take(self.alphas_cumprod, t)).sqrt(), x_t)
        return (x_t - c * eps) / a.sqrt()

    # -- VE frame --------------------------------------------------------------------------
    def sigma_ve(self, t) -> Tensor:
        return _take(self.sigma_table, t)

    def network_time(self, sigma) -> Tensor:
        """The integer timestep whose sigma_ve is nearest to ``sigma`` (log scale), as trained."""
        return _nearest_index(self.sigma_table, sigma)

    t_of_sigma = network_time

    def input_scale(self, sigma: Tensor) -> Tensor:
        return _vp_scale(sigma)

    def training_sigmas(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """t ~ Uniform{0..T-1} (Ho et al. Algorithm 1), returned as sigma_ve."""
        return self.sigma_ve(seeding.randint(self.T, (n,), generator, device=device))

    def sigmas(self, n: int | None = None, spacing: str = "trailing") -> Tensor:
        """All T timesteps, or ``n`` of them spaced as in diffusers' ``timestep_spacing`` (default
        "trailing": the grid starts at t = T-1, the largest noise level; Lin et al. 2024, Sec. 3.3),
        as a descending VE grid ending at 0."""
        return ddpm_sigmas(self, ddpm_timesteps(self.T, n or self.T, spacing))


class _SDEProcess(abc.ABC):
    """Shared VE-frame view of a continuous-time process with t in [t_min, 1]."""

    t_min: float
    t_max = 1.0

    @abc.abstractmethod
    def marginal(self, t) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps."""

    @abc.abstractmethod
    def t_of_sigma(self, sigma) -> Tensor:
        """The time of a VE noise level (the inverse of ``sigma_ve``)."""

    def sigma_ve(self, t) -> Tensor:
        alpha, sigma = self.marginal(t)
        return sigma / alpha

    def network_time(self, sigma) -> Tensor:
        """999 t (score_sde's time labels; for VE, t is normalised log sigma)."""
        return NETWORK_TIME_SCALE * self.t_of_sigma(sigma)

    def input_scale(self, sigma) -> Tensor:
        t = self.t_of_sigma(sigma)
        return _like(self.marginal(t)[0], sigma)

    def training_sigmas(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """t ~ Uniform[t_min, 1] (Song et al. 2021, eq. 7), returned as sigma_ve."""
        u = seeding.rand((n,), generator, device=device, dtype=torch.float64)
        return self.sigma_ve(self.t_min + (1 - self.t_min) * u)

    def sigmas(self, n: int, t_end: float = 1e-3) -> Tensor:
        """n times uniform in [t_end, 1] (Song et al. 2021's sampling grid), VE frame, then 0."""
        t = torch.linspace(1, t_end, n, dtype=torch.float64)
        return torch.cat([self.sigma_ve(t), t.new_zeros(1)])


class VP(_SDEProcess):
    """VP-SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, beta(t) = beta_min + t (beta_max - beta_min)
    (Song et al. 2021, eq. 11); marginal alpha_t = exp(-1/4 t^2 (b_max - b_min) - 1/2 t b_min),
    sigma_t^2 = 1 - alpha_t^2 (Appendix B, eq. 29). The T -> infinity limit of DDPM with beta_i = beta(i/T)/T."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min

    def beta(self, t) -> Tensor:
        return self.beta_min + _as_f64(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t) -> Tensor:
        t = _as_f64(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        log_a = self.log_alpha(t)
        return log_a.exp(), (-torch.expm1(2 * log_a)).sqrt()

    def _t_of_log_alpha(self, log_a: Tensor) -> Tensor:
        # Solve 1/4 d t^2 + 1/2 b_min t = -log alpha for t >= 0 (EDM Table 1, sigma^-1 for VP).
        d = self.beta_max - self.beta_min
        return (-0.5 * self.beta_min + (0.25 * self.beta_min**2 - d * log_a).sqrt()) / (0.5 * d)

    def t_of_sigma(self, sigma) -> Tensor:
        return _like(self._t_of_log_alpha(-0.5 * torch.log1p(_as_f64(sigma) ** 2)), sigma)

    def sde(self, t) -> tuple[Tensor, Tensor]:
        b = self.beta(t)
        return -0.5 * b, b.sqrt()


class SubVP(VP):
    """sub-VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)(1 - exp(-2 int_0^t beta))) dw
    (Song et al. 2021, eq. 12): same mean as VP, std sigma_t = 1 - alpha_t^2 (Appendix B, eq. 29)."""

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        log_a = self.log_alpha(t)
        return log_a.exp(), -torch.expm1(2 * log_a)

    def t_of_sigma(self, sigma) -> Tensor:
        # sigma_ve = (1 - a^2)/a  =>  a = (sqrt(sigma^2 + 4) - sigma) / 2.
        s = _as_f64(sigma)
        return _like(self._t_of_log_alpha(torch.log(((s * s + 4).sqrt() - s) / 2)), sigma)

    def sde(self, t) -> tuple[Tensor, Tensor]:
        b = self.beta(t)
        return -0.5 * b, (b * -torch.expm1(4 * self.log_alpha(t))).sqrt()


class VE(_SDEProcess):
    """VE-SDE dx = sqrt(d sigma^2/dt) dw with sigma(t) = sigma_min (sigma_max/sigma_min)^t
    (Song et al. 2021, eq. 9 and Appendix C): alpha_t = 1, sigma_t = sigma(t)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        self.sigma_min, self.sigma_max, self.t_min = sigma_min, sigma_max, t_min

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        t = _as_f64(t)
        return torch.ones_like(t), self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def t_of_sigma(self, sigma) -> Tensor:
        s = _as_f64(sigma)
        return _like(torch.log(s / self.sigma_min) / math.log(self.sigma_max / self.sigma_min), sigma)

    def input_scale(self, sigma) -> Tensor:
        return _vp_scale(sigma)  # EDM's c_in (module docstring): raw x_t = x reaches sigma_max

    def sde(self, t) -> tuple[Tensor, Tensor]:
        s = self.marginal(t)[1]
        return torch.zeros_like(s), s * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))


class NCSN:
    """NCSN's noise levels sigma_1 < ... < sigma_L, geometric (Song & Ermon 2019, Sec. 4.2): the
    discrete form of the VE-SDE. The network is conditioned on the level index."""

    t_min = 0

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, levels: int = 232):
        self.log_range = math.log(sigma_min), math.log(sigma_max)
        self.levels = torch.exp(torch.linspace(*self.log_range, levels, dtype=torch.float64))
        self.t_max = levels - 1

    def marginal(self, i) -> tuple[Tensor, Tensor]:
        s = self.sigma_ve(i)
        return torch.ones_like(s), s

    def sigma_ve(self, i) -> Tensor:
        return _take(self.levels, i)

    def t_of_sigma(self, sigma) -> Tensor:
        """The index of the level nearest to ``sigma`` (log scale)."""
        return _nearest_index(self.levels, sigma)

    def network_time(self, sigma) -> Tensor:
        """log sigma mapped affinely from [log sigma_1, log sigma_L] onto [0, 999]: level i gets
        999 i / (L - 1), and the network sees the VE-SDE's input at the same sigma."""
        log_lo, log_hi = self.log_range
        s = _as_f64(sigma).clamp_min(1e-30).log()
        return _like(NETWORK_TIME_SCALE * (s - log_lo) / (log_hi - log_lo), sigma)

    def input_scale(self, sigma) -> Tensor:
        return _vp_scale(sigma)  # as VE: the two networks see the same input at the same sigma

    def training_sigmas(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """A level drawn uniformly per sample (Song & Ermon 2019, eq. 6)."""
        return self.sigma_ve(seeding.randint(len(self.levels), (n,), generator, device=device))

    def sigmas(self, n: int | None = None) -> Tensor:
        """``n`` of the trained levels (all by default), evenly spaced in index (= geometric in
        sigma) from sigma_L down to sigma_1, then 0 (the final denoising step)."""
        count = len(self.levels)
        if not 1 <= (n or count) <= count:
            raise ValueError(f"need 1 <= n <= {count} levels, got {n}")
        index = torch.linspace(count - 1, 0, n or count, dtype=torch.float64).round().long()
        return torch.cat([self.levels[index], self.levels.new_zeros(1)])
