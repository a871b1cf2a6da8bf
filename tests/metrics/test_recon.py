import math

import pytest
import torch

from pipeline.metrics.recon import psnr, ssim


def images(seed=0, shape=(2, 3, 24, 24)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_of_a_constant_offset():
    x = images()
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((2,), 10 * math.log10(4 / 0.01)))
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.2, -0.4
    c1 = (0.01 * 2) ** 2
    got = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    torch.testing.assert_close(got, torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)]))


def test_ssim_matches_an_independent_scipy_implementation():
    ndimage = pytest.importorskip("scipy.ndimage")
    x, y = images(1), images(2) * 0.5 + images(1) * 0.5
    ref = []
    for xi, yi in zip(x.double().numpy(), y.double().numpy()):
        per_channel = []
        for u, v in zip(xi, yi):
            f = lambda t: ndimage.gaussian_filter(t, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
            mu_u, mu_v = f(u), f(v)
            vu, vv, cov = f(u * u) - mu_u**2, f(v * v) - mu_v**2, f(u * v) - mu_u * mu_v
            c1, c2 = 0.02**2, 0.06**2
            s = (2 * mu_u * mu_v + c1) * (2 * cov + c2) / ((mu_u**2 + mu_v**2 + c1) * (vu + vv + c2))
            per_channel.append(s.mean())
        ref.append(sum(per_channel) / len(per_channel))
    torch.testing.assert_close(ssim(x, y), torch.tensor(ref, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_ssim_is_one_for_identical_and_falls_with_noise():
    x = images(3)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    vals = [ssim(x, x + s * noise) for s in (0.05, 0.1, 0.3)]
    assert all(torch.all(a > b) for a, b in zip(vals, vals[1:]))
