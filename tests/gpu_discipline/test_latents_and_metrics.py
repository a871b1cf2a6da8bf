"""The latent space's fast path, and the metric code that meets device tensors, on the stand-ins.

Exceptions kept real: the Inception network is TorchScript (NVlabs' export), which neither a
meta nor a fake tensor can enter, so only our preprocessing runs here and the feature pass
itself is tests/metrics/test_features.py; KID and precision/recall end in host floats
(``float(values.mean())``), a data-dependent output, and are checked on CPU in tests/metrics.
"""

import pytest
import torch

from pipeline import seeding
from pipeline.latents import LatentSpace
from pipeline.metrics.classifier import Settings, train
from pipeline.metrics.features import SIZE, to_inception_input

LATENT = {
    "channels": 4,
    "resolution": 8,
    "channel_mean": [0.1, 0.2, 0.3, 0.4],
    "channel_std": [1.0, 2.0, 0.5, 1.5],
    "scale": 0.2,
}


def _space(kind: str) -> LatentSpace:
    codebook = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) if kind == "vq" else None
    return LatentSpace.from_manifest({**LATENT, "kind": kind}, "channel", codebook)


def _stored(kind: str) -> dict:
    """A latent batch as the encode stage stores it: int16 codes or fp16 moments, and the twins."""
    g = torch.Generator().manual_seed(1)
    if kind == "vq":
        return {name: torch.randint(16, (3, 8, 8), generator=g).to(torch.int16) for name in ("codes", "codes_flip")}
    return {
        name: torch.randn(3, 4, 8, 8, generator=g).half() for name in ("mean", "mean_flip", "logvar", "logvar_flip")
    }


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_from_batch_embeds_and_samples_on_the_device(stand_in, kind):
    batch = {name: stand_in.tensor(value) for name, value in _stored(kind).items()}
    step_generator = seeding.generator(0, "diffusion-step", 0, 0, 0)
    mirrored = torch.rand(3, generator=step_generator) < 0.5  # drawn on the CPU, as the stage does
    with stand_in.running():
        space = _space(kind).to(stand_in.device)
        x0 = space.from_batch(batch, mirrored, step_generator)
    assert x0.device == stand_in.device and x0.dtype == torch.float32 and x0.shape == (3, 4, 8, 8)


def test_snap_and_decoder_input_on_the_device(stand_in):
    x = stand_in.tensor(torch.randn(2, 4, 8, 8))
    with stand_in.running():
        space = _space("vq").to(stand_in.device)
        z = space.to_decoder(x, snap=True)
        codes = space.embed(stand_in.tensor(torch.zeros(2, 8, 8, dtype=torch.int16)))
    assert z.device == codes.device == stand_in.device


def test_inception_preprocessing_on_the_device(stand_in):
    images = stand_in.tensor(torch.rand(2, 1, 28, 28) * 2 - 1)
    with stand_in.running():
        prepared = to_inception_input(images)
    assert prepared.device == stand_in.device and prepared.shape == (2, 3, SIZE, SIZE)


def test_classifier_trains_on_the_device(meta):
    images = meta.tensor(torch.rand(16, 1, 8, 8) * 2 - 1)
    labels = meta.tensor(torch.arange(16) % 4)
    with meta.running():
        model = train(images, labels, 4, Settings(steps=2, batch_size=8))
    assert next(model.parameters()).device == meta.device
