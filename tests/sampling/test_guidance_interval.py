"""Guidance on a sigma interval (Kynkaanniemi et al. 2024): guided inside (sigma_lo, sigma_hi],
the conditional model outside, decided per sample; and its config key."""

from __future__ import annotations

import pytest
import torch

from pipeline import config
from pipeline.sampling import karras_sigmas, sample
from pipeline.sampling.generate import generate
from pipeline.sampling.guidance import classifier_free

NULL = 0  # the null label: mean 0
calls: list[int] = []


def gaussian_class(x, sigma, y):
    """Exact D of N(mu_y, I) with mu_y = y (class y, every coordinate): (x + sigma^2 mu) / (1 + sigma^2)."""
    calls.append(x.shape[0])
    s2 = sigma**2
    return (x + s2 * y[:, None].to(x.dtype)) / (1 + s2)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _guided(interval, scale=3.0, labels=None):
    labels = torch.arange(1, 7) if labels is None else labels
    return labels, classifier_free(gaussian_class, scale, {"y": labels}, {"y": torch.full_like(labels, NULL)}, interval)


def test_guided_inside_conditional_outside_per_sample():
    labels, guided = _guided((0.5, 2.0))
    x = torch.randn(6, 2, generator=_g(1), dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 0.6, 2.0, 2.1, 10.0], dtype=torch.float64)[:, None]  # 0.5 and 2.1 outside
    d_c = gaussian_class(x, sigma, labels)
    d_u = gaussian_class(x, sigma, torch.full_like(labels, NULL))
    inside = torch.tensor([False, False, True, True, False, False])[:, None]
    torch.testing.assert_close(guided(x, sigma), torch.where(inside, d_u + 3.0 * (d_c - d_u), d_c))
    # a sample's result does not depend on the other samples' noise levels
    _, alone = _guided((0.5, 2.0), labels=labels[2:3])
    torch.testing.assert_close(alone(x[2:3], sigma[2:3]), guided(x, sigma)[2:3], rtol=0, atol=0)


def test_outside_the_interval_only_the_conditional_branch_runs():
    labels, guided = _guided((0.5, 2.0))
    x = torch.randn(6, 2, generator=_g(1), dtype=torch.float64)
    calls.clear()
    out = guided(x, torch.tensor(5.0, dtype=torch.float64))
    assert calls == [6]
    torch.testing.assert_close(out, gaussian_class(x, torch.tensor(5.0, dtype=torch.float64), labels))
    calls.clear()
    guided(x, torch.tensor(1.0, dtype=torch.float64))
    assert calls == [12]  # inside: one doubled batch


def test_whole_range_is_plain_guidance_and_an_empty_range_is_the_conditional_model():
    sigmas = karras_sigmas(0.01, 20.0, 10)
    noise = 20.0 * torch.randn(6, 2, generator=_g(2), dtype=torch.float64)
    labels, everywhere = _guided((0.0, 1e9))
    _, plain = _guided(None)
    torch.testing.assert_close(sample(everywhere, noise, sigmas, "dpmpp_2m"), sample(plain, noise, sigmas, "dpmpp_2m"))
    _, nowhere = _guided((100.0, 200.0))
    conditional = sample(lambda x, s: gaussian_class(x, s, labels), noise, sigmas, "dpmpp_2m")
    torch.testing.assert_close(sample(nowhere, noise, sigmas, "dpmpp_2m"), conditional)
    _, middle = _guided((0.3, 3.0))
    assert (sample(middle, noise, sigmas, "dpmpp_2m") - conditional).abs().max() > 0.1  # guidance acted


def test_generate_passes_the_interval():
    sigmas = karras_sigmas(0.01, 20.0, 8)
    generators = [_g(10 + i) for i in range(4)]
    labels = torch.arange(1, 5)
    options = {"method": "heun", "labels": labels, "null_class": NULL, "guidance_scale": 3.0}
    beyond = generate(gaussian_class, (2,), sigmas.double(), generators, guidance_interval=(100.0, 200.0), **options)
    generators = [_g(10 + i) for i in range(4)]
    conditional = generate(gaussian_class, (2,), sigmas.double(), generators, **{**options, "guidance_scale": 1.0})
    torch.testing.assert_close(beyond, conditional)


@pytest.mark.parametrize("bad", [[1.0], [2.0, 1.0], [-1.0, 1.0], [0.1, 1.0, 2.0]])
def test_bad_interval_names_the_key(bad):
    with pytest.raises(config.ConfigError, match="sample.guidance_interval"):
        config.load(None, [f"sample.guidance_interval={bad}"])
    with pytest.raises(ValueError, match="interval"):
        _guided(tuple(bad))


def test_interval_from_the_config():
    assert config.load(None, ["sample.guidance_interval=[0.3, 5.0]"]).sample.guidance_interval == (0.3, 5.0)
    assert config.load(None, []).sample.guidance_interval == ()
