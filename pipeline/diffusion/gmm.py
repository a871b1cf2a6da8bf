"""Gaussian-mixture oracle: exact denoiser, score and log-density at every noise level.

For p_0 = sum_k pi_k N(mu_k, S_k), the VE-noised marginal x = x_0 + sigma eps is again a mixture,
p_sigma = sum_k pi_k N(mu_k, S_k + sigma^2 I), so with responsibilities
r_k(x) = pi_k N(x; mu_k, S_k + sigma^2 I) / p_sigma(x) (Bishop 2006, eq. 9.23):

- score      grad log p_sigma(x) = sum_k r_k (S_k + sigma^2 I)^{-1} (mu_k - x)
- denoiser   E[x_0 | x]          = sum_k r_k (mu_k + S_k (S_k + sigma^2 I)^{-1} (x - mu_k))
- log p_sigma(x)                 = logsumexp_k (log pi_k + log N(x; mu_k, S_k + sigma^2 I))

(Karras et al. 2022, "EDM", Sec. 3 uses the same identity D = x + sigma^2 grad log p.) Each S_k is
diagonalised once (S_k = U_k diag(l_k) U_k^T), so any per-sample sigma costs O(K d^2). It is the
reference for the sampler tests and benchmark, and a toy prior for users:

    gmm = GaussianMixture.random(dim=2, components=3, generator=g)
    x = pipeline.sampling.sample(gmm.denoiser, sigma_max * noise, sigmas, method="heun")
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline import seeding
from pipeline.sampling.frame import batch_sigma

__all__ = ["GaussianMixture", "sliced_wasserstein", "sliced_wasserstein_floor"]


class GaussianMixture:
    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        """``weights`` (K,), ``means`` (K, d), ``covs`` (K, d, d) symmetric positive definite."""
        self.weights = weights / weights.sum()
        self.means, self.covs = means, covs
        self.eigvals, self.eigvecs = torch.linalg.eigh(covs)
        if (self.eigvals <= 0).any():
            raise ValueError("mixture covariances must be positive definite")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def random(
        cls,
        dim: int,
        components: int,
        generator: torch.Generator,
        spread: float = 2.0,
        scale: tuple[float, float] = (0.05, 0.4),
        dtype=torch.float64,
    ) -> GaussianMixture:
        """Random means in [-spread, spread]^d, random rotated covariances with standard
        deviations in ``scale`` and weights in [0.5, 1.5] (normalised)."""
        g = generator
        means = (2 * seeding.rand((components, dim), g, dtype=dtype) - 1) * spread
        q, _ = torch.linalg.qr(seeding.randn((components, dim, dim), g, dtype=dtype))
        std = scale[0] + (scale[1] - scale[0]) * seeding.rand((components, dim), g, dtype=dtype)
        covs = q @ torch.diag_embed(std**2) @ q.transpose(-1, -2)
        weights = 0.5 + seeding.rand((components,), g, dtype=dtype)
        return cls(weights, means, covs)

    def to(self, dtype) -> GaussianMixture:
        return GaussianMixture(self.weights.to(dtype), self.means.to(dtype), self.covs.to(dtype))

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, sigma: float = 0.0) -> Tensor:
        """n draws from p_sigma (p_0 by default), drawn on the generator's device, returned on the
        mixture's."""
        device, dtype = self.means.device, self.means.dtype
        k = seeding.multinomial(self.weights, n, generator, device=device)
        z = seeding.randn((n, self.dim), generator, device=device, dtype=dtype)
        chol = self.eigvecs[k] * self.eigvals[k].sqrt().unsqueeze(-2)
        x = self.means[k] + (chol @ z.unsqueeze(-1)).squeeze(-1)
        if sigma:
            x = x + sigma * seeding.randn((n, self.dim), generator, device=device, dtype=dtype)
        return x

    # -- exact quantities at noise level sigma -----------------------------------------------
    def _parts(self, x: Tensor, sigma):
        """Log of pi_k N(x; mu_k, C_k) (B, K) and P_k = C_k^{-1} (x - mu_k) (B, K, d) with
        C_k = S_k + sigma^2 I. ``sigma`` is per sample (scalar, (B,), (B, 1...)), through the
        eigenbasis, or per element (x's shape: C_k = S_k + diag(sigma^2), through Cholesky),
        which conditions exactly on coordinates given at sigma = 0."""
        x = x.reshape(x.shape[0], -1)
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        resid = x.unsqueeze(1) - self.means.to(x.dtype)  # (B, K, d)
        if sig.numel() == x.numel() and self.dim > 1:
            cov = self.covs.to(x.dtype) + torch.diag_embed(sig.reshape(x.shape) ** 2).unsqueeze(1)
            chol = torch.linalg.cholesky(cov)  # (B, K, d, d)
            prec_resid = torch.cholesky_solve(resid.unsqueeze(-1), chol).squeeze(-1)
            logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        else:
            lam = self.eigvals.to(x.dtype).unsqueeze(0) + batch_sigma(sig, x).reshape(-1, 1, 1) ** 2
            u = self.eigvecs.to(x.dtype)
            prec_resid = torch.einsum("kde,bke->bkd", u, torch.einsum("kde,bkd->bke", u, resid) / lam)
            logdet = lam.log().sum(-1)
        quad = (resid * prec_resid).sum(-1)
        logw = -0.5 * (quad + logdet + self.dim * math.log(2 * math.pi)) + self.weights.to(x.dtype).log()
        return logw, prec_resid

    def responsibilities(self, x: Tensor, sigma=0.0) -> Tensor:
        """p(component k | x) at noise level sigma, (B, K)."""
        return torch.softmax(self._parts(x, sigma)[0], -1)

    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        """log p_sigma(x) per sample."""
        return torch.logsumexp(self._parts(x, sigma)[0], -1)

    def score(self, x: Tensor, sigma) -> Tensor:
        """grad_x log p_sigma(x)."""
        logw, prec_resid = self._parts(x, sigma)
        return -(torch.softmax(logw, -1).unsqueeze(-1) * prec_resid).sum(1).reshape(x.shape)

    def denoiser(self, x: Tensor, sigma, **cond) -> Tensor:
        """E[x_0 | x_0 + sigma eps = x]: the exact D of the mixture (the Bayes-optimal denoiser).
        With a per-element ``sigma`` (zeros on known coordinates) it is the exact conditional D."""
        logw, prec_resid = self._parts(x, sigma)
        m = self.means.to(x.dtype) + torch.einsum("kde,bke->bkd", self.covs.to(x.dtype), prec_resid)
        return (torch.softmax(logw, -1).unsqueeze(-1) * m).sum(1).reshape(x.shape)

    __call__ = denoiser

    def mmd(self, samples: Tensor, bandwidth: float, chunk: int = 2048) -> float:
        """Squared MMD between ``samples`` and this mixture with the normalised Gaussian kernel
        k(x, y) = N(x - y; 0, l^2 I) (Gretton et al. 2012, eq. 3 and the unbiased U-statistic of
        Lemma 6 for the sample-sample term). The mixture terms are exact:
        E_{y~p} k(x, y) = p_l(x) (this mixture noised to sigma = l) and
        E_{x,y~p} k = sum_jk pi_j pi_k N(mu_j - mu_k; 0, S_j + S_k + l^2 I), so the only noise is the
        samples' own. Returned relative to E_{x,y~p} k (dimensionless)."""
        x = samples.reshape(samples.shape[0], -1).to(self.means.dtype)
        n, d = x.shape
        eye = torch.eye(d, dtype=x.dtype)
        diff = self.means[:, None] - self.means[None]
        cov = self.covs[:, None] + self.covs[None] + bandwidth**2 * eye
        pp = (
            self.weights[:, None]
            * self.weights[None]
            * torch.distributions.MultivariateNormal(torch.zeros(d, dtype=x.dtype), cov).log_prob(diff).exp()
        ).sum()
        qp = self.log_prob(x, bandwidth).exp().mean()
        log_norm = -0.5 * d * math.log(2 * math.pi * bandwidth**2)
        qq = x.new_zeros(())
        for i in range(0, n, chunk):
            sq = torch.cdist(x[i : i + chunk], x, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
            qq = qq + (log_norm - sq / (2 * bandwidth**2)).exp().sum() - sq.shape[0] * math.exp(log_norm)  # i = j
        qq = qq / (n * (n - 1))
        return float((qq - 2 * qp + pp) / pp)

    # -- conditioning --------------------------------------------------------------------
    def condition(self, index: Tensor, value: Tensor, noise_std: float = 0.0) -> GaussianMixture:
        """p(x_rest | y) for the observation y = x[index] + noise_std * n: again a mixture, with
        each component conditioned (Bishop 2006, eqs. 2.81-2.82) and reweighted by its evidence
        N(y; mu_k[index], S_k[index, index] + noise_std^2 I)."""
        index = torch.as_tensor(index)
        rest = torch.tensor([i for i in range(self.dim) if i not in set(index.tolist())])
        s_oo = self.covs[:, index][:, :, index] + noise_std**2 * torch.eye(len(index), dtype=self.covs.dtype)
        s_ro = self.covs[:, rest][:, :, index]
        s_rr = self.covs[:, rest][:, :, rest]
        gain = s_ro @ torch.linalg.inv(s_oo)
        resid = value - self.means[:, index]
        means = self.means[:, rest] + (gain @ resid.unsqueeze(-1)).squeeze(-1)
        covs = s_rr - gain @ s_ro.transpose(-1, -2)
        evidence = torch.distributions.MultivariateNormal(self.means[:, index], s_oo).log_prob(value)
        weights = torch.softmax(self.weights.log() + evidence, 0)
        return GaussianMixture(weights, means, 0.5 * (covs + covs.transpose(-1, -2)))


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced 1-Wasserstein distance between two equal-size sample sets (Rabin et al. 2011):
    the mean over random unit directions of the 1-D W1 of the projections (sorted differences).
    Used with fresh mixture samples as the reference, its finite-sample floor is the same
    statistic between two fresh sets."""
    if a.shape != b.shape:
        raise ValueError(f"need equal-size sample sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    theta = seeding.randn((a.shape[1], projections), generator, device=a.device, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0)).to(a.dtype)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    return float((pa - pb).abs().mean())


def sliced_wasserstein_floor(mixture: GaussianMixture, n: int, repeats: int = 8, seed: int = 100) -> float:
    """The finite-sample floor of :func:`sliced_wasserstein` for n samples of ``mixture``: mean +
    3 std over ``repeats`` pairs of fresh sample sets (a test threshold for exact samplers)."""
    values = torch.tensor(
        [
            sliced_wasserstein(
                mixture.sample(n, torch.Generator().manual_seed(seed + 2 * i)),
                mixture.sample(n, torch.Generator().manual_seed(seed + 2 * i + 1)),
                generator=torch.Generator().manual_seed(seed),
            )
            for i in range(repeats)
        ]
    )
    return float(values.mean() + 3 * values.std())
