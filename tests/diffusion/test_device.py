"""Device discipline of the diffusion math on a CPU-only machine (issue 17's two crashes).

Fake CUDA tensors (``FakeTensorMode``) give CUDA's device rules without a GPU: a CPU table
indexed by, or combined with, a CUDA tensor raises there as it would on a GPU. They do not catch
a CPU generator drawing straight onto CUDA, which real CUDA refuses, so ``strict_generators``
wraps torch's random constructors to refuse it too. Modules are built before the wrapping
(``with torch.device(...)`` recognises constructors by identity).
"""

from __future__ import annotations

import ast
import contextlib
import functools
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline import config
from pipeline.diffusion import DDPM, NCSN, VE, VP, Denoiser, GaussianMixture, SubVP
from pipeline.diffusion.build import LOSSES, build_network, drop_labels
from pipeline.diffusion.losses import vlb
from pipeline.sampling.frame import noise_like

PROCESSES = {"ddpm": DDPM.linear(), "vp": VP(), "subvp": SubVP(), "ve": VE(), "ncsn": NCSN(levels=20)}
RANDOM = ("randn", "rand", "randint", "randperm", "multinomial", "normal", "bernoulli")
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def strict_generators(monkeypatch):
    """torch's random constructors refuse a generator whose device differs from the output's
    (the output follows ``device=``, else the first tensor argument, else the default device)."""

    def checked(name, draw, *args, generator=None, **kwargs):
        if generator is not None:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            device = torch.device(kwargs.get("device") or (tensor.device if tensor is not None else "cpu"))
            if device.type != generator.device.type:
                raise RuntimeError(f"torch.{name}: a {generator.device.type} generator cannot draw onto {device}")
        return draw(*args, generator=generator, **kwargs)

    with monkeypatch.context() as patch:
        for name in RANDOM:
            patch.setattr(torch, name, functools.partial(checked, name, getattr(torch, name)))
        yield


@pytest.fixture(scope="module")
def unet():
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.device("cuda"):
        net = build_network(config.DiffusionConfig(), 4, 8, 10)
    return mode, net


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("prediction", sorted(LOSSES))
def test_a_training_loss_of_the_default_unet_runs_on_cuda(unet, monkeypatch, name, prediction):
    # Bug 1: network_time read a CPU table and returned the timestep on the CPU, which then met
    # the CUDA weights of the time embedding. Bug 2: the noise was drawn by a CPU generator
    # directly onto CUDA.
    mode, net = unet
    with mode, strict_generators(monkeypatch):
        x0 = torch.randn(2, 4, 8, 8, device="cuda")
        labels = drop_labels(torch.zeros(2, dtype=torch.long, device="cuda"), 0.1, 10, _g(1))
        loss = LOSSES[prediction](net, PROCESSES[name], x0, _g(), y=labels)
        assert loss.device.type == "cuda" and labels.device.type == "cuda"


@pytest.mark.parametrize("name", ["ddpm", "ncsn"])
def test_the_denoiser_reads_discrete_tables_on_the_input_device(unet, name):
    mode, net = unet
    with mode:
        x = torch.randn(2, 4, 8, 8, device="cuda")
        out = Denoiser(net, PROCESSES[name], "v")(
            x, torch.full((2,), 3.0, device="cuda"), y=torch.zeros(2, dtype=torch.long, device="cuda")
        )
        assert out.device.type == "cuda"
        process = PROCESSES[name]
        for t in (process.t_of_sigma(torch.ones(2, device="cuda")), torch.zeros(2, dtype=torch.long, device="cuda")):
            assert process.sigma_ve(t).device.type == "cuda" and process.marginal(t)[0].device.type == "cuda"


def test_vlb_noise_and_timesteps_follow_the_data(monkeypatch):
    process = DDPM.linear(T=50)
    with FakeTensorMode(allow_non_fake_inputs=True), strict_generators(monkeypatch):
        x0 = torch.rand(3, 6, device="cuda") * 2 - 1
        assert vlb(lambda x, t: 0.9 * x, process, x0, _g()).device.type == "cuda"


def test_sampler_noise_and_mixture_samples_draw_on_the_generator_device(monkeypatch):
    mixture = GaussianMixture.random(2, 3, _g())
    with FakeTensorMode(allow_non_fake_inputs=True), strict_generators(monkeypatch):
        x = torch.zeros(4, 3, device="cuda")
        assert noise_like(x, _g()).device.type == "cuda"
        assert noise_like(x, [_g(i) for i in range(4)]).device.type == "cuda"
    with strict_generators(monkeypatch):
        mixture.sample(8, _g(), sigma=0.5)


def test_library_draws_only_through_seeding():
    # What the fake tensors cannot run (the adaptive solver's accept/reject loop, a sampler's
    # branch on sigma = 0) is held to the same rule statically: a generator is handed to a
    # torch constructor only in pipeline/seeding.py, which draws on the generator's device.
    offenders = []
    for path in [*(ROOT / "pipeline/diffusion").glob("*.py"), *(ROOT / "pipeline/sampling").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and node.func.attr in RANDOM
                and any(k.arg == "generator" for k in node.keywords)
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
