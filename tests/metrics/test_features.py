import numpy as np
import pytest
import torch

from pipeline import weights
from pipeline.metrics.features import DIMS, InceptionFeatures, tf_bilinear_resize, to_inception_input
from pipeline.metrics.fid import FeatureStats, frechet_distance


def images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tf1_resize_bilinear(x, out_h, out_w):
    """TF1 ``tf.image.resize_bilinear(align_corners=False)`` (the TTUR FID graph's resize),
    written from its definition: output pixel i samples input coordinate i * in / out."""

    def axis(n_in, n_out):
        src = np.arange(n_out) * (n_in / n_out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = axis(x.shape[-2], out_h)
    x0, x1, fx = axis(x.shape[-1], out_w)
    top = x[..., y0, :][..., x0] * (1 - fx) + x[..., y0, :][..., x1] * fx
    bottom = x[..., y1, :][..., x0] * (1 - fx) + x[..., y1, :][..., x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


@pytest.mark.parametrize("size, out", [((28, 28), (299, 299)), ((37, 50), (299, 120)), ((400, 320), (299, 299))])
def test_resize_is_tf1_legacy_bilinear(size, out):
    x = images((2, 3, *size)) * 127.5 + 127.5
    expected = tf1_resize_bilinear(x.double().numpy(), *out)
    np.testing.assert_allclose(tf_bilinear_resize(x.double(), out).numpy(), expected, atol=1e-9)
    # float32 sampling coordinates: within 0.02 of 255 levels
    np.testing.assert_allclose(tf_bilinear_resize(x, out).numpy(), expected, atol=2e-2)


def test_input_convention():
    """8-bit levels v -> (v - 128) / 128 at 299 x 299; gray == gray repeated to RGB."""
    levels = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(1))
    net_input = to_inception_input(levels / 127.5 - 1)
    torch.testing.assert_close(net_input, (levels.float() - 128) / 128)
    gray = ((images((2, 1, 28, 28), seed=2) + 1) * 127.5).round() / 127.5 - 1
    got = to_inception_input(gray)
    assert got.shape == (2, 3, 299, 299) and got.dtype == torch.float32
    torch.testing.assert_close(got, to_inception_input(gray.expand(-1, 3, -1, -1)))
    assert got.min() >= -1 and got.max() <= 127 / 128
    # images off the 8-bit levels score as their rounded (PNG) version
    torch.testing.assert_close(to_inception_input(gray + 0.3 / 255), got)
    with pytest.raises(ValueError):
        to_inception_input(images((2, 2, 8, 8)))


def test_missing_weights_name_the_fetch_command(tmp_path):
    with pytest.raises(weights.WeightsMissingError, match="latentpipe weights fetch fid-inception"):
        InceptionFeatures(cache=tmp_path)


@pytest.fixture(scope="module")
def net(weights_cache):
    return InceptionFeatures(weights_cache)


def test_real_network_features(net):
    """6 images through the real network (~0.4 s each on one CPU core): 2048-d non-negative pool
    features, independent of the batch they come in, gray == RGB-repeated gray; FID(x, x) = 0."""
    gray = images((1, 1, 28, 28), seed=3)
    x = torch.cat([gray.expand(-1, 3, -1, -1), images((2, 3, 28, 28), seed=4)])
    together = net(x)
    assert together.shape == (3, DIMS) and together.dtype == torch.float32
    assert torch.isfinite(together).all() and (together >= 0).all()
    apart = torch.cat([net(gray), net(x[1:])])  # other batches, and the 1-channel image as such
    torch.testing.assert_close(apart, together, rtol=1e-4, atol=1e-4)
    stats = FeatureStats.of(together)
    assert abs(frechet_distance(stats, stats)) < 1e-6 * np.trace(stats.cov)
