"""The diffusion model's latent space: normalisation inverts, snapping lands on codebook vectors,
mirrored twins and posterior samples are picked per sample."""

import math

import torch

from pipeline.latents import LatentSpace

LATENT = {
    "kind": "vq",
    "channels": 3,
    "resolution": 4,
    "channel_mean": [0.5, -1.0, 2.0],
    "channel_std": [2.0, 0.5, 1.0],
    "scale": 0.7,
}


def _space(normalize="channel", kind="vq"):
    codebook = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    return LatentSpace.from_manifest({**LATENT, "kind": kind}, normalize, codebook if kind == "vq" else None), codebook


def test_normalisation_is_standardisation_and_inverts():
    space, _ = _space()
    z = torch.randn(5, 3, 4, 4)
    x = space.to_model(z)
    expected = (z - torch.tensor(LATENT["channel_mean"]).view(1, 3, 1, 1)) / torch.tensor(LATENT["channel_std"]).view(
        1, 3, 1, 1
    )
    assert torch.allclose(x, expected)
    assert torch.allclose(space.from_model(x), z, atol=1e-6)
    scaled, _ = _space("scale")
    assert torch.allclose(scaled.to_model(z), 0.7 * z)


def test_snap_returns_the_nearest_codebook_vector_at_every_position():
    space, codebook = _space()
    codes = torch.randint(16, (2, 4, 4))
    exact = space.embed(codes)
    assert torch.equal(space.snap(exact + 1e-4 * torch.randn_like(exact)), exact)
    z = torch.randn(2, 3, 4, 4)
    snapped = space.snap(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    brute = codebook[((flat[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)]
    assert torch.equal(snapped.permute(0, 2, 3, 1).reshape(-1, 3), brute)
    assert torch.allclose(space.to_decoder(space.to_model(exact), snap=True), exact, atol=1e-6)


def test_from_batch_picks_the_mirrored_twin_per_sample():
    space, _ = _space()
    codes, flipped = torch.randint(16, (2, 4, 4)), torch.randint(16, (2, 4, 4))
    x = space.from_batch({"codes": codes, "codes_flip": flipped}, mirrored=torch.tensor([False, True]))
    assert torch.allclose(x[0], space.to_model(space.embed(codes[:1]))[0])
    assert torch.allclose(x[1], space.to_model(space.embed(flipped[1:]))[0])


def test_kl_posterior_samples_have_the_posterior_moments():
    space, _ = _space(kind="kl")
    mean, logvar = torch.full((4000, 3, 4, 4), 1.5), torch.full((4000, 3, 4, 4), -2.0)
    z = space.from_model(space.from_batch({"mean": mean, "logvar": logvar}, generator=torch.Generator().manual_seed(1)))
    assert abs(z.mean().item() - 1.5) < 0.01 and abs(z.std().item() - math.exp(0.5 * -2.0)) < 0.01
    assert torch.equal(
        space.from_batch({"mean": mean[:2], "logvar": logvar[:2]}, sample_posterior=False), space.to_model(mean[:2])
    )
