"""UniPC (bh2) against its special cases and the exact ODE solution of a Gaussian mixture
(the match with diffusers' scheduler is in test_peer_conformance.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion import GaussianMixture
from pipeline.sampling import karras_sigmas, sample
from pipeline.sampling.edm import heun
from pipeline.sampling.unipc import unipc


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return GaussianMixture.random(dim=2, components=3, generator=_g(0), spread=1.0)


def _noise(n: int = 64, sigma: float = 40.0) -> torch.Tensor:
    return sigma * torch.randn(n, 2, generator=_g(1), dtype=torch.float64)


def test_first_order_predictor_is_ddim(gmm):
    """UniP-1 is x_next = (sigma_next/sigma) x - (e^{-h} - 1) D = DDIM (Euler on the PF-ODE)."""
    sigmas = karras_sigmas(0.01, 40.0, 7)
    ours = sample(gmm.denoiser, _noise(), sigmas, method="unipc", order=1, corrector=False)
    torch.testing.assert_close(ours, sample(gmm.denoiser, _noise(), sigmas, method="ddim"), rtol=1e-12, atol=1e-12)


def test_second_order_predictor_is_dpm_solver_pp_2m(gmm):
    """UniP-2's rho = 1/2 with r = -h_prev/h gives D + (D - D_prev) h/(2 h_prev): DPM-Solver++(2M)."""
    sigmas = karras_sigmas(0.01, 40.0, 9)
    ours = sample(gmm.denoiser, _noise(), sigmas, method="unipc", order=2, corrector=False)
    torch.testing.assert_close(ours, sample(gmm.denoiser, _noise(), sigmas, method="dpmpp_2m"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_corrector_brings_the_solution_closer_at_no_extra_cost(gmm, order):
    """Against a fine Heun solution of the same ODE on an interval without the final jump."""
    grid = torch.linspace(math.log(3.0), math.log(0.3), 11, dtype=torch.float64).exp()
    x = _noise(256, 3.0)
    exact = heun(gmm.denoiser, x, torch.linspace(math.log(3.0), math.log(0.3), 2001, dtype=torch.float64).exp())
    calls = []

    def counted(x_, sigma):
        calls.append(1)
        return gmm.denoiser(x_, sigma)

    errors = {}
    for corrector in (False, True):
        calls.clear()
        errors[corrector] = float((unipc(counted, x, grid, order=order, corrector=corrector) - exact).abs().max())
        assert len(calls) == len(grid) - 1
    assert errors[True] < 0.8 * errors[False], errors
    finer = torch.linspace(math.log(3.0), math.log(0.3), 21, dtype=torch.float64).exp()
    assert float((unipc(gmm.denoiser, x, finer, order=order) - exact).abs().max()) < errors[True] / 3  # converges


def test_batch_independent_and_inputs_untouched(gmm):
    sigmas = karras_sigmas(0.01, 40.0, 8)
    noise = _noise(4)
    kept = noise.clone()
    batch = sample(gmm.denoiser, noise, sigmas, method="unipc", order=3)
    alone = sample(gmm.denoiser, noise[2:3], sigmas, method="unipc", order=3)
    assert torch.equal(noise, kept)
    torch.testing.assert_close(alone, batch[2:3], rtol=1e-12, atol=1e-12)


def test_rejects_order_zero(gmm):
    with pytest.raises(ValueError, match="order"):
        sample(gmm.denoiser, _noise(2), karras_sigmas(0.01, 40.0, 4), method="unipc", order=0)
