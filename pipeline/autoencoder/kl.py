"""Gaussian (KL-regularised) VAE bottleneck (Kingma & Welling 2014, "Auto-Encoding Variational
Bayes"), as in LDM's KL-f autoencoders.

- Posterior q(z|x) = N(mu, diag(sigma^2)) from the encoder's 2C output channels (mean, log var).
- Reparameterisation (Sec. 2.4): z = mu + sigma * eps, eps ~ N(0, I).
- KL(q(z|x) || N(0, I)) in closed form (App. B): 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2).
- Decoder likelihood p(x|z) = N(x_hat, s^2 I) with a learned scalar s, so the negative ELBO
  -E_q[log p(x|z)] + KL(q || p) bounds -log p(x) of the continuous density, in nats. It is not
  a bound on the probability of 8-bit images unless training sees dequantised data x + u,
  u ~ U(bin) (Theis et al. 2016, "A note on the evaluation of generative models", Sec. 3.1),
  which it does not: training logs it as nats per dimension, never as bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline import seeding

LOGVAR_RANGE = (-30.0, 20.0)
"""Clamp of the encoder's log-variance (as LDM's DiagonalGaussianDistribution): keeps exp finite."""


@dataclass
class DiagonalGaussian:
    """q(z|x) with ``mean`` and ``logvar`` of shape (N, C, h, w)."""

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split the encoder's (N, 2C, h, w) output into mean and (clamped) log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(*LOGVAR_RANGE))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator) -> Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I) drawn from ``generator`` (reparameterisation)."""
        eps = seeding.randn(self.mean.shape, generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, in nats: 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)."""
        terms = self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar
        return 0.5 * terms.flatten(1).sum(1)


def gaussian_nll(x: Tensor, x_hat: Tensor, log_scale: Tensor) -> Tensor:
    """-log N(x; x_hat, s^2 I) per sample, in nats, with s = exp(log_scale):
    sum_j [(x_j - x_hat_j)^2 / (2 s^2) + log s + 1/2 log(2 pi)]."""
    sq = (x - x_hat).pow(2).flatten(1)
    return (0.5 * sq * torch.exp(-2 * log_scale) + log_scale + 0.5 * math.log(2 * math.pi)).sum(1)


def negative_elbo(
    x: Tensor, x_hat: Tensor, posterior: DiagonalGaussian, log_scale: Tensor, kl_weight: float = 1.0
) -> dict[str, Tensor]:
    """Per-sample terms of the (weighted) objective -E_q[log p(x|z)] + kl_weight * KL, with the
    expectation estimated by the single sample that produced ``x_hat``. ``loss`` is the batch
    mean of the weighted sum (the training loss); ``nelbo`` is the unweighted bound in nats."""
    nll, kl = gaussian_nll(x, x_hat, log_scale), posterior.kl()
    return {"nll": nll, "kl": kl, "nelbo": nll + kl, "loss": (nll + kl_weight * kl).mean()}
