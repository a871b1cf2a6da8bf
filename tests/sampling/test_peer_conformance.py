"""Ours == the peer's where a peer implements the same method, on the same grid, in float64.

diffusers (x_t frame, eps-network of a discrete schedule): DPMSolverMultistepScheduler
(dpmsolver++, 2M) vs ``dpmpp_2m``, UniPCMultistepScheduler (bh2, orders 1-3, with and without
its corrector, its own and Karras grids) vs ``unipc``, and DDIMScheduler on the "trailing" grid
that visits t = T - 1 (tests/sampling/test_diffusers_equivalence.py covers DDIM's "leading" grid
and DDPM). k-diffusion (VE frame, the same denoiser): ``sample_euler``, ``sample_heun``,
``sample_dpmpp_2m`` and ``sample_dpmpp_3m_sde`` (eta 0 and 1, fed the same noise) vs ours.

The network is the exact eps-predictor of a Gaussian mixture. The multistep schedulers round
their grid to float32 (``set_timesteps``); we run both on that rounded grid. DPMSolverMultistep
additionally casts the sample to float32 inside every step, so it agrees to 1e-6, not to
rounding; everything else agrees to 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import DDPM, Denoiser, GaussianMixture
from pipeline.sampling import ddpm_sigmas, karras_sigmas, sample
from tools.peer_samplers import (
    diffusers_sample,
    diffusers_scheduler,
    eps_network,
    k_diffusion_sample,
    scheduler_sigmas,
)

pytest.importorskip("diffusers")

# diffusers' linear schedule, rounded to float32 as it stores it, as the one shared schedule.
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32).double()


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def setup():
    gmm = GaussianMixture.random(dim=3, components=3, generator=_g(0), spread=1.0)
    process = DDPM(BETAS)
    eps_net = eps_network(gmm.denoiser, process)
    latents = torch.randn(128, 3, generator=_g(1), dtype=torch.float64)  # x_T, VP frame
    return process, eps_net, Denoiser(eps_net, process, prediction="eps"), latents


def _against_diffusers(setup, name: str, steps: int, method: str, config: dict, options: dict):
    process, eps_net, denoiser, latents = setup
    scheduler = diffusers_scheduler(name, BETAS, steps, **config)
    theirs = diffusers_sample(scheduler, eps_net, latents)
    sigmas = scheduler_sigmas(scheduler, process)
    ours = sample(denoiser, latents * (1 + sigmas[0] ** 2).sqrt(), sigmas, method=method, **options)
    return sigmas, ours, theirs


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_matches_diffusers_dpmsolver_multistep(setup, steps):
    process, *_ = setup
    sigmas, ours, theirs = _against_diffusers(setup, "DPMSolverMultistep", steps, "dpmpp_2m", {}, {})
    # The grid is the process's own timesteps (diffusers' "linspace" spacing, starting at T - 1).
    scheduler = diffusers_scheduler("DPMSolverMultistep", BETAS, steps)
    torch.testing.assert_close(sigmas, ddpm_sigmas(process, scheduler.timesteps), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector", [True, False])
def test_unipc_matches_diffusers_unipc_bh2(setup, steps, order, corrector):
    config = {"solver_order": order, "solver_type": "bh2", "predict_x0": True}
    if not corrector:
        config["disable_corrector"] = list(range(steps))
    _, ours, theirs = _against_diffusers(
        setup, "UniPCMultistep", steps, "unipc", config, {"order": order, "corrector": corrector}
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_unipc_matches_diffusers_on_the_karras_grid(setup):
    config = {"solver_order": 3, "use_karras_sigmas": True}
    _, ours, theirs = _against_diffusers(setup, "UniPCMultistep", 8, "unipc", config, {"order": 3})
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [5, 20])
def test_ddim_matches_diffusers_on_the_trailing_grid(setup, steps):
    sigmas, ours, theirs = _against_diffusers(setup, "DDIM", steps, "ddim", {"timestep_spacing": "trailing"}, {})
    assert sigmas[0] == setup[0].sigma_table[-1]  # trailing spacing starts at t = T - 1
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [5, 15])
def test_ode_samplers_match_k_diffusion(setup, method, steps):
    *_, denoiser, latents = setup
    sigmas = karras_sigmas(0.01, 40.0, steps)
    x = latents * sigmas[0]
    ours = sample(denoiser, x, sigmas, method=method)
    torch.testing.assert_close(ours, k_diffusion_sample(method, denoiser, x, sigmas), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_3m_sde_matches_k_diffusion_with_the_same_noise(setup, eta):
    *_, denoiser, latents = setup
    sigmas = karras_sigmas(0.01, 40.0, 12)
    x = latents * sigmas[0]
    ours = sample(denoiser, x, sigmas, method="dpmpp_3m_sde", generator=_g(5), eta=eta)
    theirs = k_diffusion_sample("dpmpp_3m_sde", denoiser, x, sigmas, _g(5), eta=eta)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    if eta:  # the noise matters: another stream gives another result
        other = k_diffusion_sample("dpmpp_3m_sde", denoiser, x, sigmas, _g(6), eta=eta)
        assert (other - theirs).abs().max() > 1e-3
