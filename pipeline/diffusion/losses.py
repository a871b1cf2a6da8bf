"""Training losses. Weighting is explicit: every loss takes ``weighting(sigma) -> weight`` over
the VE noise levels drawn by ``process.training_sigmas``.

With x_t = alpha x_0 + s eps (alpha = ``process.input_scale(sigma)``, s = alpha sigma) and the
network seeing (x_t, network_time(sigma)):
- ``eps_loss``: L_simple = E ||eps - eps_theta(x_t, t)||^2 (Ho et al. 2020, eq. 14);
- ``x0_loss``:  E ||x_0 - x0_theta(x_t, t)||^2;
- ``v_loss``:   E ||v - v_theta(x_t, t)||^2, v = alpha eps - s x_0 (Salimans & Ho 2022, Sec. 4);
- ``dsm_loss``: denoising score matching sum_i lambda(sigma_i) E ||s_theta(x_t, i) + eps / s||^2
  with grad log q(x_t | x_0) = -eps / s and lambda(sigma) = s^2 by default
  (Song & Ermon 2019, eqs. 2 and 6; Vincent 2011), where s_theta = net / s is the network's
  output divided by the process's marginal std (score_sde; see
  :mod:`pipeline.diffusion.parameterization`; for VE and NCSN that std is sigma, not s);
- ``vlb``: the DDPM variational bound L_T + sum_t L_{t-1} + L_0 in closed form, bits/dim
  (Ho et al. 2020, eq. 5, eq. 13 for the discretised decoder L_0).
Squared norms are means over the non-batch dimensions. Noise is drawn on the generator's own
device and moved to the data's (:mod:`pipeline.seeding`), so a CPU generator serves CUDA data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pipeline import seeding
from pipeline.diffusion.process import Process
from pipeline.sampling.frame import batch_sigma

__all__ = ["constant", "dsm_loss", "eps_loss", "min_snr", "sigma_squared", "v_loss", "vlb", "vlb_term", "x0_loss"]

Weighting = Callable[[Tensor], Tensor]


def constant(sigma: Tensor) -> Tensor:
    """lambda = 1 (L_simple's weighting)."""
    return torch.ones_like(sigma)


def sigma_squared(sigma: Tensor) -> Tensor:
    """lambda(sigma) = sigma^2 in the VE frame (NCSN's choice, Song & Ermon 2019, Sec. 4.2)."""
    return sigma**2


def min_snr(gamma: float, prediction: str) -> Weighting:
    """Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", Sec. 3.4): weight the x0 error by min(SNR, gamma), SNR = alpha^2 / s^2 = 1 / sigma^2
    in the VE frame, so the easy low-noise levels stop dominating the gradient. Expressed for the
    target the network predicts: the eps error is SNR times the x0 error, the v error (1 + SNR)
    times it (where alpha^2 + s^2 = 1: DDPM, VP and VE's c_in frame), hence min(SNR, gamma) / SNR
    and min(SNR, gamma) / (SNR + 1), the weights of diffusers' training scripts (``--snr_gamma``)."""
    divisor = {"x0": lambda snr: torch.ones_like(snr), "eps": lambda snr: snr, "v": lambda snr: snr + 1}[prediction]

    def weighting(sigma: Tensor) -> Tensor:
        snr = sigma.pow(-2)
        return snr.clamp(max=gamma) / divisor(snr)

    return weighting


def _perturb(net, process: Process, x0: Tensor, generator, **cond):
    """Draw sigma and eps, build x_t = alpha x_0 + s eps and run the network on it."""
    sigma = batch_sigma(process.training_sigmas(x0.shape[0], generator, device=x0.device), x0)
    alpha = process.input_scale(sigma).to(x0.dtype)
    eps = seeding.randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    s = alpha * sigma
    out = net(alpha * x0 + s * eps, process.network_time(sigma.reshape(-1)), **cond)
    return sigma.reshape(-1), alpha, s, eps, out


def _weighted_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    per_sample = (pred - target).pow(2).reshape(pred.shape[0], -1).mean(1)
    return (weight.to(per_sample.dtype) * per_sample).mean()


def eps_loss(net, process, x0: Tensor, generator=None, weighting: Weighting = constant, **cond) -> Tensor:
    sigma, _, _, eps, out = _perturb(net, process, x0, generator, **cond)
    return _weighted_mse(out, eps, weighting(sigma))


def x0_loss(net, process, x0: Tensor, generator=None, weighting: Weighting = constant, **cond) -> Tensor:
    sigma, _, _, _, out = _perturb(net, process, x0, generator, **cond)
    return _weighted_mse(out, x0, weighting(sigma))


def v_loss(net, process, x0: Tensor, generator=None, weighting: Weighting = constant, **cond) -> Tensor:
    sigma, alpha, s, eps, out = _perturb(net, process, x0, generator, **cond)
    return _weighted_mse(out, alpha * eps - s * x0, weighting(sigma))


def dsm_loss(net, process, x0: Tensor, generator=None, weighting: Weighting | None = None, **cond) -> Tensor:
    """Weighted DSM; the default weighting lambda = std^2 (sigma^2 for VE/NCSN) makes every level's
    term O(1) (Song & Ermon 2019, eq. 6), std being the process's marginal std. With
    s_theta = out / std the term lambda ||out / std + eps / std||^2 is computed as
    (lambda / std^2) ||out + eps||^2, which never forms the O(1/std) score (std ~ 1e-6 for
    sub-VP at t_min)."""
    sigma, _, _, eps, out = _perturb(net, process, x0, generator, **cond)
    if weighting is None:
        return _weighted_mse(out, -eps, torch.ones_like(sigma))
    # The score is of the process's own x_t, whose std is alpha_t sigma (sigma for VE and NCSN,
    # whose network input is scaled by EDM's c_in instead, pipeline.diffusion.schedules).
    std = sigma * process.marginal(process.t_of_sigma(sigma))[0].to(sigma)
    return _weighted_mse(out, -eps, weighting(sigma) / std**2)


# -- the variational bound ------------------------------------------------------------------
def _normal_kl(mean1: Tensor, var1, mean2: Tensor, var2) -> Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element (closed form)."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def _discretised_gaussian_log_likelihood(x0: Tensor, mean: Tensor, var) -> Tensor:
    """log of N(mean, var) mass on x0's bin of width 2/255 in [-1, 1], edge bins extended to
    +-infinity (Ho et al. 2020, eq. 13)."""
    normal = torch.distributions.Normal(
        mean, torch.as_tensor(var, dtype=mean.dtype).sqrt(), validate_args=False
    )  # no host sync
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
    return torch.log((upper - lower).clamp_min(1e-12))


def _decoder_variance(process, t: Tensor, variance: str) -> Tensor:
    """sigma_t^2 of p_theta: beta_t or beta~_t. At t = 0 both take beta~ of t = 1 (beta~_0 = 0), as
    in Ho et al.'s code: posterior_log_variance_clipped for "posterior", and "fixedlarge"'s
    append(posterior_variance[1], betas[1:]) for "beta"."""
    clipped = process.posterior_variance(torch.where(t == 0, torch.ones_like(t), t))
    if variance == "beta":
        return torch.where(t == 0, clipped, process.betas.to(t.device)[t])
    return clipped


def vlb_term(eps_net, process, x0: Tensor, t: Tensor, noise: Tensor, variance: str = "posterior", **cond) -> Tensor:
    """Per-sample L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) in nats (index t >= 1),
    or L_0 = -log p_theta(x_0 | x_1) for t = 0, at x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    t = torch.as_tensor(t).reshape(-1).expand(x0.shape[0])
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a, s = (c.to(x0.dtype).reshape(shape) for c in process.marginal(t))
    x_t = a * x0 + s * noise
    mean = process.posterior_mean_from_eps(t.reshape(shape), x_t, eps_net(x_t, t, **cond))
    var = _decoder_variance(process, t, variance).to(x0.dtype).reshape(shape)
    true_mean = process.posterior_mean(t.reshape(shape), x_t, x0)
    true_var = process.posterior_variance(t).to(x0.dtype).reshape(shape)
    kl = _normal_kl(true_mean, true_var.clamp_min(1e-30), mean, var)
    nll = -_discretised_gaussian_log_likelihood(x0, mean, var)
    per_elem = torch.where((t == 0).reshape(shape), nll, kl)
    return per_elem.reshape(x0.shape[0], -1).sum(1)


def _prior_kl(process, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per sample, nats."""
    a, s = process.marginal(process.T - 1)
    kl = _normal_kl(a.to(x0.dtype) * x0, (s**2).to(x0.dtype), torch.zeros_like(x0), torch.tensor(1.0, dtype=x0.dtype))
    return kl.reshape(x0.shape[0], -1).sum(1)


def vlb(
    eps_net, process, x0: Tensor, generator=None, variance: str = "posterior", full: bool = False, **cond
) -> Tensor:
    """Per-sample L_VLB in bits/dim for data x0 in [-1, 1] on the 8-bit grid.

    ``full=False``: the unbiased one-term estimate L_T + T L_{t-1} with t ~ Uniform{0..T-1}
    (one network call; differentiable, usable as a loss term). ``full=True``: all T terms.
    """
    dims = x0[0].numel()
    total = _prior_kl(process, x0)
    if full:
        for t in range(process.T):
            noise = seeding.randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
            total = total + vlb_term(eps_net, process, x0, torch.tensor(t), noise, variance, **cond)
    else:
        drawn = seeding.randint(process.T, (x0.shape[0],), generator, device=x0.device)
        noise = seeding.randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        total = total + process.T * vlb_term(eps_net, process, x0, drawn, noise, variance, **cond)
    return total / (dims * math.log(2))
