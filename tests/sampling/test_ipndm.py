"""iPNDM: its first-order case, and the Adams-Bashforth orders against the exact ODE solution of
a Gaussian mixture on a grid uniform in sigma (where the fixed weights are the exact ones)."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import GaussianMixture
from pipeline.sampling import karras_sigmas, sample
from pipeline.sampling.edm import heun
from pipeline.sampling.ipndm import ipndm


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return GaussianMixture.random(dim=2, components=3, generator=_g(0), spread=1.0)


def test_first_order_is_euler(gmm):
    sigmas = karras_sigmas(0.01, 40.0, 7)
    noise = 40.0 * torch.randn(32, 2, generator=_g(1), dtype=torch.float64)
    ours = sample(gmm.denoiser, noise, sigmas, method="ipndm", max_order=1)
    torch.testing.assert_close(ours, sample(gmm.denoiser, noise, sigmas, method="euler"), rtol=1e-12, atol=1e-12)


def test_each_order_is_more_accurate_on_a_uniform_grid(gmm):
    x = 2.0 * torch.randn(256, 2, generator=_g(1), dtype=torch.float64)
    exact = heun(gmm.denoiser, x, torch.linspace(2.0, 0.5, 3001, dtype=torch.float64))
    grid = torch.linspace(2.0, 0.5, 31, dtype=torch.float64)
    errors = [float((ipndm(gmm.denoiser, x, grid, max_order=k) - exact).abs().max()) for k in (1, 2, 3, 4)]
    assert all(a > 2 * b for a, b in zip(errors, errors[1:])), errors


def test_batch_independent_and_inputs_untouched(gmm):
    sigmas = karras_sigmas(0.01, 40.0, 8)
    noise = 40.0 * torch.randn(4, 2, generator=_g(1), dtype=torch.float64)
    kept = noise.clone()
    batch = sample(gmm.denoiser, noise, sigmas, method="ipndm")
    assert torch.equal(noise, kept)
    torch.testing.assert_close(
        sample(gmm.denoiser, noise[1:2], sigmas, method="ipndm"), batch[1:2], rtol=1e-12, atol=1e-12
    )


def test_rejects_unknown_order(gmm):
    with pytest.raises(ValueError, match="max_order"):
        sample(
            gmm.denoiser,
            torch.zeros(1, 2, dtype=torch.float64),
            karras_sigmas(0.01, 40.0, 4),
            method="ipndm",
            max_order=5,
        )
