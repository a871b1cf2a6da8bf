"""Exact likelihood through the PF-ODE against the mixture's analytic log-density, and encode/decode."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion.gmm import GaussianMixture
from pipeline.diffusion.likelihood import bits_per_dim, decode, encode, log_likelihood

SIGMA_MIN, SIGMA_MAX = 1e-3, 100.0


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_exact_trace_is_within_one_percent_per_sample():
    gmm = GaussianMixture.random(dim=8, components=3, generator=_g(0), scale=(0.05, 0.3))
    x = gmm.sample(4, _g(1))
    analytic = gmm.log_prob(x, SIGMA_MIN)
    exact_prior = log_likelihood(
        gmm.denoiser, x, SIGMA_MIN, SIGMA_MAX, estimator="exact", prior=lambda z: gmm.log_prob(z, SIGMA_MAX)
    )
    assert ((exact_prior - analytic).abs() <= 0.01 * analytic.abs()).all()
    # The default N(0, sigma_max^2) prior is off by O(|x_0| / sigma_max) nats.
    default_prior = log_likelihood(gmm.denoiser, x, SIGMA_MIN, 10 * SIGMA_MAX, estimator="exact")
    assert ((default_prior - analytic).abs() <= 0.01 * analytic.abs()).all()


def test_hutchinson_estimate_is_within_one_percent_on_average():
    # Axis-aligned components in 32-D: |log p| grows with d while the probe variance (from the
    # off-diagonal posterior covariance) does not, the regime the estimator is meant for.
    g = _g(0)
    means = (2 * torch.rand(4, 32, generator=g, dtype=torch.float64) - 1) * 2
    std = 0.02 + 0.08 * torch.rand(4, 32, generator=g, dtype=torch.float64)
    gmm = GaussianMixture(torch.ones(4, dtype=torch.float64), means, torch.diag_embed(std**2))
    x = gmm.sample(16, _g(1))
    analytic = gmm.log_prob(x, SIGMA_MIN).mean()
    info = {}
    estimate = log_likelihood(gmm.denoiser, x, SIGMA_MIN, SIGMA_MAX, generator=_g(11), probes=2, info=info).mean()
    assert abs(float(estimate / analytic) - 1) < 0.01
    assert info["nfe"] > 0 and info["steps"] > 0


def test_hutchinson_is_unbiased_for_the_exact_trace():
    gmm = GaussianMixture.random(dim=3, components=2, generator=_g(3))
    x = gmm.sample(2, _g(4))
    exact = log_likelihood(gmm.denoiser, x, 1e-2, 50.0, estimator="exact", rtol=1e-4, atol=1e-4)
    for estimator in ("rademacher", "gaussian"):
        runs = torch.stack(
            [
                log_likelihood(
                    gmm.denoiser,
                    x,
                    1e-2,
                    50.0,
                    generator=_g(10 + i),
                    estimator=estimator,
                    probes=4,
                    rtol=1e-4,
                    atol=1e-4,
                )
                for i in range(12)
            ]
        )
        se = runs.std(0) / math.sqrt(len(runs))
        assert ((runs.mean(0) - exact).abs() < 4 * se + 1e-3).all(), estimator


def test_bits_per_dim_uses_uniform_dequantisation():
    gmm = GaussianMixture.random(dim=4, components=2, generator=_g(5), spread=0.5)
    images = torch.randint(0, 256, (3, 4), generator=_g(6))
    bpd = bits_per_dim(gmm.denoiser, images, SIGMA_MIN, SIGMA_MAX, generator=_g(7), estimator="exact")
    g = _g(7)
    x = 2 * (images.double() + torch.rand(images.shape, generator=g, dtype=torch.float64)) / 256 - 1
    expected = -(gmm.log_prob(x, SIGMA_MIN) + 4 * math.log(2 / 256)) / (4 * math.log(2))
    torch.testing.assert_close(bpd, expected, rtol=1e-3, atol=1e-3)


def test_decode_inverts_encode_with_error_falling_with_steps():
    gmm = GaussianMixture.random(dim=2, components=3, generator=_g(8))
    x = gmm.sample(32, _g(9), sigma=0.01)
    errors = []
    for steps in (16, 32, 64):
        z = encode(gmm.denoiser, x, 0.01, 80.0, steps=steps)
        errors.append(float((decode(gmm.denoiser, z, 0.01, 80.0, steps=steps) - x).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3
    assert errors[1] / errors[2] > 3  # second order: ~4x per doubling
    z = encode(gmm.denoiser, x, 0.01, 80.0)  # adaptive
    assert float((decode(gmm.denoiser, z, 0.01, 80.0) - x).abs().max()) < 1e-3
    assert abs(float(z.std()) / 80.0 - 1) < 0.3  # the latent is noise-scaled


@pytest.mark.parametrize("estimator", ["bogus"])
def test_unknown_estimator_is_refused(estimator):
    gmm = GaussianMixture.random(dim=2, components=1, generator=_g(0))
    with pytest.raises(ValueError, match="estimator"):
        log_likelihood(gmm.denoiser, gmm.sample(1, _g(1)), SIGMA_MIN, SIGMA_MAX, estimator=estimator)
