"""Our ddpm/ddim samplers against diffusers' DDPMScheduler/DDIMScheduler for the same
eps-network and the same noise (diffusers is a test-only dependency).

The network is the exact eps-predictor of a Gaussian mixture under the linear DDPM schedule; we
sample in the VE frame through the eps -> D wrapper, diffusers in the x_t frame, and the
results agree once mapped through x_ve = x_t / sqrt(alphabar_t)."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import DDPM, Denoiser, GaussianMixture
from pipeline.sampling import ddpm_sigmas, ddpm_timesteps, sample
from tools.peer_samplers import float64_tables

diffusers = pytest.importorskip("diffusers")

T = 1000
SCHEDULE = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def setup():
    gmm = GaussianMixture.random(dim=3, components=3, generator=_g(0), spread=1.0)
    reference = diffusers.DDPMScheduler(**SCHEDULE)
    process = DDPM(reference.betas)  # the same (float32-rounded) betas diffusers uses

    def eps_net(x_t, t):
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
        sigma = process.sigma_ve(t).to(x_t.dtype)[:, None]
        x = x_t * (1 + sigma**2).sqrt()
        return (x - gmm.denoiser(x, sigma)) / sigma

    return process, eps_net, Denoiser(eps_net, process, prediction="eps")


def _run_diffusers(scheduler, eps_net, latents, generator, **step_options):
    x = latents
    for t in scheduler.timesteps:
        x = scheduler.step(eps_net(x, t), t, x, generator=generator, **step_options).prev_sample
    return x


def _ours(process, denoiser, latents, timesteps, method, generator, **options):
    sigmas = ddpm_sigmas(process, timesteps)
    noise = latents * (1 + sigmas[0] ** 2).sqrt()  # x_ve = x_t / sqrt(alphabar_t)
    return sample(denoiser, noise, sigmas, method=method, generator=generator, **options)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers(setup, steps, eta, spacing):
    # diffusers steps from t to t - T // steps, the next timestep of these two spacings.
    process, eps_net, denoiser = setup
    scheduler = float64_tables(
        diffusers.DDIMScheduler(**SCHEDULE, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)
    )
    scheduler.set_timesteps(steps)
    latents = torch.randn(256, 3, generator=_g(1), dtype=torch.float64)
    theirs = _run_diffusers(scheduler, eps_net, latents, _g(2), eta=eta)
    timesteps = ddpm_timesteps(T, steps, spacing)
    assert torch.equal(timesteps, scheduler.timesteps.long())
    ours = _ours(process, denoiser, latents, timesteps, "ddim", _g(2), eta=eta)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance,variance_type", [("posterior", "fixed_small"), ("beta", "fixed_large")])
@pytest.mark.parametrize("steps", [20, T])
def test_ddpm_matches_diffusers(setup, variance, variance_type, steps):
    process, eps_net, denoiser = setup
    scheduler = float64_tables(
        diffusers.DDPMScheduler(**SCHEDULE, variance_type=variance_type, timestep_spacing="leading")
    )
    scheduler.set_timesteps(steps)
    latents = torch.randn(64, 3, generator=_g(1), dtype=torch.float64)
    theirs = _run_diffusers(scheduler, eps_net, latents, _g(2))
    timesteps = ddpm_timesteps(T, steps, "leading")
    assert torch.equal(timesteps, scheduler.timesteps.long())
    ours = _ours(process, denoiser, latents, timesteps, "ddpm", _g(2), variance=variance)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
