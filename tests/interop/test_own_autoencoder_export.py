"""latentpipe's own KL autoencoder exported as a diffusers AutoencoderKL computes the same
posterior and reconstruction."""

import diffusers  # in the test extra: a missing install fails rather than skips
import pytest
import torch

from pipeline.autoencoder.build import build_autoencoder
from pipeline.config import AutoencoderConfig
from pipeline.errors import LatentpipeError
from pipeline.interop import export_autoencoder_kl

from .conftest import images, randomise


def _own(**options):
    cfg = AutoencoderConfig(kind="kl", channels=16, norm_groups=8, latent_channels=4, **options)
    return randomise(build_autoencoder(cfg, 3), seed=4)


@pytest.mark.parametrize(
    "options",
    [
        dict(channel_mult=(1, 2), num_res_blocks=1, attention=True),
        dict(channel_mult=(1, 2, 2), num_res_blocks=2, attention=False),
    ],
)
def test_own_kl_exports_as_an_equal_autoencoder_kl(tmp_path, options):
    ours = _own(**options)
    export_autoencoder_kl(ours, tmp_path / "vae", scaling_factor=0.4)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == 0.4
    x = images()
    with torch.no_grad():
        posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(reference.mean, posterior.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(reference.logvar, posterior.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.decode(posterior.mean).sample, ours.decode(posterior.mean), rtol=0, atol=1e-5)


def test_what_does_not_map_is_refused(tmp_path):
    with pytest.raises(LatentpipeError, match=r"channel_mult\[0\] != 1"):
        export_autoencoder_kl(_own(channel_mult=(2, 2)), tmp_path / "a", scaling_factor=0.4)
    with pytest.raises(LatentpipeError, match="pass the one the encode stage measured"):
        export_autoencoder_kl(_own(channel_mult=(1, 2)), tmp_path / "b")
    vq = build_autoencoder(AutoencoderConfig(kind="vq", channels=16, norm_groups=8, channel_mult=(1, 2)), 3)
    with pytest.raises(LatentpipeError, match="a VQAutoencoder does not export to diffusers"):
        export_autoencoder_kl(vq, tmp_path / "c", scaling_factor=1.0)
    assert list(tmp_path.iterdir()) == []
