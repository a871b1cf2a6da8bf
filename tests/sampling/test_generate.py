"""generate(): a sample depends only on its own generator, and no autograd graph is kept."""

import torch

from pipeline.diffusion.gmm import GaussianMixture
from pipeline.sampling import karras_sigmas
from pipeline.sampling.generate import generate


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_a_sample_does_not_depend_on_its_batch_for_stochastic_samplers():
    mixture = GaussianMixture.random(2, 3, torch.Generator().manual_seed(0)).to(torch.float32)
    sigmas = karras_sigmas(0.01, 20.0, 12)
    for method in ("ddpm", "euler_maruyama", "dpmpp_3m_sde"):
        four = generate(mixture.denoiser, (2,), sigmas, _gens([5, 6, 7, 8]), method=method)
        two = generate(mixture.denoiser, (2,), sigmas, _gens([7, 8]), method=method)
        assert torch.allclose(four[2:], two, atol=1e-6), method
        assert not torch.allclose(four[0], four[1])


def test_guided_generation_keeps_no_graph():
    net = torch.nn.Linear(3, 3)

    def denoiser(x, sigma, y=None):
        return net(x) * (1.0 if y is None else 1 + y.float()[:, None])

    out = generate(
        denoiser,
        (3,),
        karras_sigmas(0.1, 5.0, 4),
        _gens(range(4)),
        method="heun",
        labels=torch.tensor([0, 1, 0, 1]),
        null_class=2,
        guidance_scale=2.0,
    )
    assert out.shape == (4, 3) and not out.requires_grad
