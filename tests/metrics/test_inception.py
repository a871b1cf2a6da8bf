"""The folded, channels-last Inception (pipeline.metrics.inception) computes the TorchScript
export's features: the equivalence evaluate's FID/KID/precision-recall rely on."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.metrics.features import InceptionFeatures
from pipeline.metrics.inception import BN_EPS, FoldedConv


def rand(shape, seed, low=-1.0, high=1.0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * (high - low) + low


@pytest.mark.parametrize("stride, padding, kernel", [(1, 0, (1, 1)), (2, 1, (3, 3)), (1, [0, 3], (1, 7))])
def test_folded_conv_is_conv_batch_norm_relu(stride, padding, kernel):
    """relu(conv(x, w / s, beta - mean / s)) == relu(batch_norm(conv(x, w), mean, var, beta)), s = sqrt(var + eps)."""
    layer = SimpleNamespace(
        weight=rand((6, 4, *kernel), 0),
        mean=rand((6,), 1),
        var=rand((6,), 2, 0.01, 2.0),
        beta=rand((6,), 3),
        stride=stride,
        padding=padding,
    )
    x = rand((2, 4, 11, 13), 4)
    pad = padding if isinstance(padding, int) else tuple(padding)
    conv = F.conv2d(x, layer.weight, None, stride, pad)
    expected = F.relu(F.batch_norm(conv, layer.mean, layer.var, None, layer.beta, False, 0.1, BN_EPS))
    torch.testing.assert_close(FoldedConv(layer)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def nets(weights_cache):
    return InceptionFeatures(weights_cache, folded=True), InceptionFeatures(weights_cache, folded=False)


def test_folded_network_features_equal_the_export(nets):
    """Gray and colour digits-sized images and a full-size one (~1 s per path on one core): features
    within 1e-4 of the TorchScript export's (they differ by float32 rounding only, ~1e-5)."""
    folded, export = nets
    small = torch.cat([rand((1, 1, 28, 28), 5).expand(-1, 3, -1, -1), rand((1, 3, 28, 28), 6)])
    for images in (small, rand((1, 3, 299, 299), 7), rand((2, 1, 32, 32), 8)):
        fast, reference = folded(images), export(images)
        assert fast.shape == reference.shape == (len(images), 2048)
        assert reference.abs().max() > 0.1  # a real signal, not zeros on both sides
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
