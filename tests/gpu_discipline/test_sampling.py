"""Sampling and likelihoods against the GPU stand-ins.

Data-dependent exception: every solver branches on the values of its sigma grid
(``check_grid``'s descending check, ``if sigma_next == 0``, rk45's and the likelihood's
accept/reject), which neither stand-in can read. So here the stand-ins run what carries the
device risk without those branches (the sampler noise for one generator and for one per
sample, a guided denoiser call, the inpainting-conditioned denoiser call, the likelihood's
Hutchinson probes and first ODE evaluation), and every solver in ``METHODS`` runs for real on
the CPU for a few steps, guided and inpainting.
"""

import functools

import pytest
import torch

from pipeline import seeding
from pipeline.diffusion.likelihood import log_likelihood
from pipeline.diffusion.parameterization import Denoiser
from pipeline.diffusion.schedules import DDPM
from pipeline.networks import build_denoiser
from pipeline.sampling import METHODS, karras_sigmas, sample
from pipeline.sampling.guidance import classifier_free
from pipeline.sampling.inverse import inpainting
from pipeline.sampling.steps import noise_like

CLASSES = 3


def _denoiser(device_module=lambda m: m) -> Denoiser:
    torch.manual_seed(0)
    net = build_denoiser(
        "dit", input_size=8, in_channels=4, patch_size=2, width=32, depth=1, num_heads=2, num_classes=CLASSES
    )
    with torch.no_grad():  # past the zero initialisation, so the score is not 0 (pc/langevin divide by it)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return Denoiser(device_module(net.eval()), DDPM.linear(50), "eps")


def _guided(denoiser: Denoiser, labels: torch.Tensor):
    return classifier_free(denoiser, 2.0, {"y": labels}, {"y": torch.full_like(labels, CLASSES)})


def test_sampler_noise_from_one_generator(stand_in):
    x = stand_in.tensor(torch.zeros(2, 4, 8, 8))
    with stand_in.running():
        noise = noise_like(x, seeding.generator(0, "sample"))
    assert noise.device == stand_in.device


def test_sampler_noise_from_one_generator_per_sample(stand_in):
    x = stand_in.tensor(torch.zeros(2, 4, 8, 8))
    with stand_in.running():
        noise = noise_like(x, [seeding.generator(0, "sample", i) for i in range(2)])
    assert noise.device == stand_in.device


def test_guided_denoiser_call(stand_in):
    denoiser = _denoiser(stand_in.module)
    x, labels = stand_in.tensor(torch.randn(2, 4, 8, 8)), stand_in.tensor(torch.tensor([0, 2]))
    with stand_in.running(), torch.no_grad():
        out = _guided(denoiser, labels)(x, stand_in.tensor(torch.tensor(3.0)))
    assert out.device == stand_in.device and out.shape == x.shape


def test_inpainting_denoiser_call_on_meta(meta):
    denoiser = _denoiser(meta.module)
    known, x = meta.tensor(torch.randn(2, 4, 8, 8)), meta.tensor(torch.randn(2, 4, 8, 8))
    mask = meta.tensor((torch.arange(8) < 4).float().expand(2, 4, 8, 8))
    with meta.running():
        out = inpainting(denoiser, known, mask)(x, meta.tensor(torch.tensor(3.0)))
    assert out.device == meta.device


def test_likelihood_runs_on_meta_up_to_the_solvers_first_step_decision(meta):
    """The Hutchinson probes (drawn with the caller's CPU generator) and the first evaluation of
    the ODE with its vector-Jacobian products run on meta; the accept/reject that follows reads
    a value back, which is where the stand-in stops (the solver runs for real in
    tests/diffusion/test_likelihood.py)."""
    denoiser = _denoiser(meta.module)
    x = meta.tensor(torch.randn(2, 4, 8, 8))
    with meta.running(), pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        log_likelihood(
            functools.partial(denoiser, y=meta.tensor(torch.tensor([0, 1]))),
            x,
            0.01,
            10.0,
            generator=seeding.generator(0, "likelihood"),
        )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_sampler_guided_and_inpainting_on_the_cpu(method):
    denoiser, labels = _denoiser(), torch.tensor([0, 2])
    sigmas = karras_sigmas(0.02, 10.0, 3)
    noise = seeding.randn((2, 4, 8, 8), seeding.generator(0, "noise")) * sigmas[0]
    generators = [seeding.generator(0, "sample", i) for i in range(2)]
    known, mask = torch.zeros(2, 4, 8, 8), (torch.arange(8) < 4).float().expand(2, 4, 8, 8)
    with torch.no_grad():
        guided = sample(_guided(denoiser, labels), noise, sigmas, method=method, generator=generators)
    inpainted = sample(
        inpainting(functools.partial(denoiser, y=labels), known, mask),
        noise,
        sigmas,
        method=method,
        generator=generators,
    )
    assert torch.isfinite(guided).all() and torch.isfinite(inpainted).all()
