"""Classifier-free guidance: one batched call, the guidance formula, and its limits."""

from __future__ import annotations

import torch

from pipeline.diffusion.gmm import GaussianMixture
from pipeline.sampling import karras_sigmas, sample
from pipeline.sampling.guidance import classifier_free


def _g(seed):
    return torch.Generator().manual_seed(seed)


COMPONENTS = GaussianMixture.random(dim=2, components=3, generator=_g(0))
NULL = 3  # the "no class" label


def class_conditional(x, sigma, label):
    """Exact D of the mixture given its component label (label 3 = the whole mixture)."""
    calls.append(x.shape[0])
    out = COMPONENTS.denoiser(x, sigma)
    for k in range(3):
        single = GaussianMixture(
            torch.ones(1, dtype=torch.float64), COMPONENTS.means[k : k + 1], COMPONENTS.covs[k : k + 1]
        )
        pick = label == k
        out = torch.where(pick[:, None], single.denoiser(x, sigma), out)
    return out


calls: list[int] = []


def test_one_batched_call_per_evaluation_and_the_guidance_formula():
    x = COMPONENTS.sample(8, _g(1), sigma=1.0)
    sigma = torch.full((8, 1), 1.0, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,), generator=_g(2))
    guided = classifier_free(class_conditional, 2.5, {"label": labels}, {"label": torch.full((8,), NULL)})
    calls.clear()
    out = guided(x, sigma)
    assert calls == [16]
    d_c, d_u = class_conditional(x, sigma, labels), class_conditional(x, sigma, torch.full((8,), NULL))
    torch.testing.assert_close(out, d_u + 2.5 * (d_c - d_u))


def test_scale_one_samples_the_conditional_and_zero_the_unconditional():
    labels = torch.full((256,), 1)
    null = torch.full((256,), NULL)
    noise = 80 * torch.randn(256, 2, generator=_g(3), dtype=torch.float64)
    sigmas = karras_sigmas(0.002, 80.0, 20)
    for scale, label in ((1.0, labels), (0.0, null)):
        guided = classifier_free(class_conditional, scale, {"label": labels}, {"label": null})
        direct = sample(lambda x, s, label=label: class_conditional(x, s, label), noise, sigmas, "heun")
        torch.testing.assert_close(sample(guided, noise, sigmas, "heun"), direct)


def _responsibility_of(k, x):
    """p(component k | x_0 = x) under the mixture."""
    return COMPONENTS.responsibilities(x)[:, k]


def test_guidance_scale_moves_mass_towards_the_class():
    labels = torch.full((512,), 0)
    noise = 80 * torch.randn(512, 2, generator=_g(4), dtype=torch.float64)
    sigmas = karras_sigmas(0.002, 80.0, 20)
    share = []
    for scale in (0.0, 0.5, 1.0):
        guided = classifier_free(class_conditional, scale, {"label": labels}, {"label": torch.full((512,), NULL)})
        share.append(float(_responsibility_of(0, sample(guided, noise, sigmas, "dpmpp_2m")).mean()))
    assert share[0] < share[1] < share[2] and share[2] > 0.95
