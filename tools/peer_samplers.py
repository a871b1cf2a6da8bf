"""Peer samplers (k-diffusion, diffusers) run on our denoiser contract, for the conformance tests
(tests/sampling/test_peer_conformance.py) and the sampler benchmark (tools/bench_samplers.py).

- k-diffusion's samplers take the VE-frame denoiser D(x, sigma) directly (its own convention);
- diffusers' schedulers run in the x_t frame on an eps-network of a discrete DDPM schedule, with
  their schedule tables recomputed in float64 from the same betas.

Both are test/benchmark-only dependencies (the ``test`` extra); nothing in ``pipeline`` imports them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pipeline.sampling import ddpm_sigmas
from pipeline.sampling.frame import noise_like


def k_diffusion_sampling() -> types.ModuleType:
    """``k_diffusion.sampling`` without the package's ``__init__``, which imports its CLIP-based
    evaluation module (clip needs ``pkg_resources``, gone from setuptools >= 81); the sampling
    module itself needs only torch, scipy, torchdiffeq and torchsde."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise ModuleNotFoundError("k-diffusion is not installed (pip install '.[test]')")
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations or [])
        sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling")


def k_diffusion_sample(
    name: str,
    denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    **options,
) -> Tensor:
    """k-diffusion's ``sample_<name>`` from x (at sigmas[0]) along ``sigmas``. Stochastic samplers
    draw their noise as our solvers do (``noise_like``: one draw per step from ``generator``, or
    one row per sample from a list of per-sample generators), instead of k-diffusion's default
    Brownian tree. ``dpm_adaptive`` uses only the two end levels (``rtol``/``atol`` in
    ``options``) and finishes with the denoising jump from the last positive level to 0, as our
    ``rk45`` does."""
    k = k_diffusion_sampling()
    model = denoiser  # k-diffusion calls model(x, sigma) with sigma of shape (B,), as batch_sigma accepts
    if name == "dpm_adaptive":
        sigma_min, sigma_max = sigmas[-2], sigmas[0]
        x = k.sample_dpm_adaptive(model, x, float(sigma_min), float(sigma_max), disable=True, **options)
        return denoiser(x, sigma_min.expand(x.shape[0]))
    if name == "dpmpp_3m_sde":
        options.setdefault(
            "noise_sampler",
            lambda sigma, sigma_next: noise_like(x, generator),
        )
    return getattr(k, f"sample_{name}")(model, x, sigmas, disable=True, **options)


def float64_tables(scheduler):
    """diffusers keeps its tables in float32; recompute them in float64 from the same betas
    (before ``set_timesteps``, which derives the sigmas from them)."""
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.one
    return scheduler


def diffusers_scheduler(name: str, betas: Tensor, steps: int, float64: bool = True, **config):
    """diffusers' ``<name>Scheduler`` ("DDIM", "DPMSolverMultistep", "UniPCMultistep",
    "DEISMultistep") on the schedule ``betas``, set to ``steps`` timesteps; with ``float64``
    its tables and grid in float64 (for float64 comparisons), else as it ships (float32, for a
    float32 network)."""
    import diffusers

    if name == "DDIM":
        config = {"clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0, **config}
    scheduler = getattr(diffusers, f"{name}Scheduler")(
        num_train_timesteps=len(betas), trained_betas=betas.tolist(), **config
    )
    if not float64:
        scheduler.set_timesteps(steps)
        return scheduler
    float64_tables(scheduler)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "sigmas"):  # the multistep schedulers round their grid to float32: the
        scheduler.sigmas = scheduler.sigmas.double()  # grid, then float64 arithmetic on it
    return scheduler


def scheduler_sigmas(scheduler, process) -> Tensor:
    """The VE noise levels (then 0) a set diffusers ``scheduler`` visits on the discrete ``process``:
    the multistep schedulers keep them in ``sigmas``; DDIM only has its timesteps."""
    return scheduler.sigmas if hasattr(scheduler, "sigmas") else ddpm_sigmas(process, scheduler.timesteps)


def diffusers_sample(
    scheduler,
    eps_net: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    generator: torch.Generator | None = None,
    **step_options,
) -> Tensor:
    """The scheduler's loop from x_T = ``latents`` on eps_net(x_t, t); one evaluation per timestep."""
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        if generator is not None:
            step_options["generator"] = generator
        x = scheduler.step(eps_net(model_input, t), t, x, **step_options).prev_sample
    return x


def eps_network(denoiser, process) -> Callable[[Tensor, Tensor], Tensor]:
    """eps_theta(x_t, t) of a VE-frame denoiser under a discrete ``process``:
    (x - D(x, sigma_t)) / sigma_t at x = x_t / alpha_t (EDM Table 1 read backwards)."""

    def net(x_t: Tensor, t) -> Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
        sigma = process.sigma_ve(t).to(x_t.dtype).reshape(-1, *[1] * (x_t.dim() - 1))
        x = x_t * (1 + sigma**2).sqrt()
        return (x - denoiser(x, sigma)) / sigma

    return net
