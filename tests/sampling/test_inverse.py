"""Inpainting and y = A x + n posterior sampling against analytic conditionals, with ODE and SDE
samplers. Thresholds come from the finite-sample floor (fresh conditional samples vs fresh)."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.gmm import GaussianMixture, sliced_wasserstein, sliced_wasserstein_floor
from pipeline.sampling import karras_sigmas, sample
from pipeline.sampling.inverse import inpainting, posterior_denoiser

N = 2000
# An ODE and an SDE sampler, each with a grid fine enough for its discretisation error to vanish.
FINE = {"heun": karras_sigmas(0.002, 80.0, 40), "euler_maruyama": karras_sigmas(0.002, 80.0, 200)}
SAMPLERS = sorted(FINE)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _run(denoiser, method, dim):
    noise = 80.0 * torch.randn(N, dim, generator=_g(2), dtype=torch.float64)
    return sample(denoiser, noise, FINE[method], method=method, generator=_g(3))


@pytest.mark.parametrize("method", SAMPLERS)
def test_known_coordinate_of_the_mixture_gives_the_analytic_conditional(method):
    gmm = GaussianMixture.random(dim=2, components=3, generator=_g(0))
    y = torch.tensor([0.3], dtype=torch.float64)
    analytic = gmm.condition(torch.tensor([0]), y)
    known = torch.cat([y, torch.zeros(1, dtype=torch.float64)]).expand(N, 2)
    mask = torch.tensor([1.0, 0.0]).expand(N, 2)
    x = _run(inpainting(gmm.denoiser, known, mask, method="per_element_sigma"), method, 2)
    assert torch.equal(x[:, 0], y.expand(N))
    err = sliced_wasserstein(x[:, 1:], analytic.sample(N, _g(1)), generator=_g(7))
    floor = sliced_wasserstein_floor(analytic, N)
    assert err <= floor, (err, floor)


def _gaussian(dim=3):
    g = _g(5)
    root = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = 0.3 * root @ root.T / dim + 0.05 * torch.eye(dim, dtype=torch.float64)
    mean = torch.randn(1, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.ones(1, dtype=torch.float64), mean, cov[None])


@pytest.mark.parametrize("method", SAMPLERS)
def test_posterior_guidance_inpainting_is_exact_for_a_gaussian_prior(method):
    prior = _gaussian()
    y = torch.tensor([0.5], dtype=torch.float64)
    analytic = prior.condition(torch.tensor([0]), y)
    known = torch.cat([y, torch.zeros(2, dtype=torch.float64)]).expand(N, 3)
    mask = torch.tensor([1.0, 0.0, 0.0]).expand(N, 3)
    x = _run(inpainting(prior.denoiser, known, mask, cg_steps=1), method, 3)
    assert (x[:, 0] - 0.5).abs().max() < 1e-6
    err = sliced_wasserstein(x[:, 1:], analytic.sample(N, _g(1)), generator=_g(7))
    floor = sliced_wasserstein_floor(analytic, N)
    assert err <= floor, (err, floor)


@pytest.mark.parametrize("method", SAMPLERS)
def test_noisy_linear_measurement_gives_the_analytic_posterior_for_a_gaussian_prior(method):
    prior = _gaussian()
    A = torch.randn(2, 3, generator=_g(6), dtype=torch.float64)
    noise_std = 0.1
    y = torch.tensor([0.4, -0.2], dtype=torch.float64)
    # Gaussian posterior (Bishop 2006, eqs. 2.113-2.117).
    mu, S = prior.means[0], prior.covs[0]
    gain = S @ A.T @ torch.linalg.inv(A @ S @ A.T + noise_std**2 * torch.eye(2, dtype=torch.float64))
    analytic = GaussianMixture(
        torch.ones(1, dtype=torch.float64), (mu + gain @ (y - A @ mu))[None], (S - gain @ A @ S)[None]
    )
    denoiser = posterior_denoiser(prior.denoiser, lambda z: z @ A.T, y.expand(N, 2), noise_std, cg_steps=2)
    x = _run(denoiser, method, 3)
    err = sliced_wasserstein(x, analytic.sample(N, _g(1)), generator=_g(7))
    floor = sliced_wasserstein_floor(analytic, N)
    assert err <= floor, (err, floor)


def test_posterior_guidance_on_the_mixture_is_close_but_approximate():
    # p(x_0 | x) is a mixture, not a Gaussian, so moment matching is an approximation there:
    # much closer to the conditional than the unconditional samples, not at the floor.
    gmm = GaussianMixture.random(dim=2, components=3, generator=_g(0))
    y = torch.tensor([0.3], dtype=torch.float64)
    reference = gmm.condition(torch.tensor([0]), y).sample(N, _g(1))
    known = torch.cat([y, torch.zeros(1, dtype=torch.float64)]).expand(N, 2)
    mask = torch.tensor([1.0, 0.0]).expand(N, 2)
    guided = _run(inpainting(gmm.denoiser, known, mask, cg_steps=1), "heun", 2)
    unconditional = _run(gmm.denoiser, "heun", 2)
    err = sliced_wasserstein(guided[:, 1:], reference, generator=_g(7))
    assert err < 0.1 and err < 0.2 * sliced_wasserstein(unconditional[:, 1:], reference, generator=_g(7))


def test_options_are_checked():
    gmm = GaussianMixture.random(dim=2, components=1, generator=_g(0))
    with pytest.raises(ValueError, match="noise_std"):
        posterior_denoiser(gmm.denoiser, lambda z: z, torch.zeros(1, 2), covariance="none")
    with pytest.raises(ValueError, match="covariance"):
        posterior_denoiser(gmm.denoiser, lambda z: z, torch.zeros(1, 2), covariance="full")
    with pytest.raises(ValueError, match="method"):
        inpainting(gmm.denoiser, torch.zeros(1, 2), torch.ones(1, 2), method="repaint")
