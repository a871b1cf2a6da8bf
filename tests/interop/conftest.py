"""Tiny randomly initialised diffusers models, saved the way published ones are (save_pretrained).
Their GroupNorms have 32 groups, as every LDM autoencoder's, so that they have an LDM form."""

import diffusers  # in the test extra: a missing install fails rather than skips
import pytest
import torch

KL_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=16,
    scaling_factor=0.3,
)
VQ_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=3,
    vq_embed_dim=3,
    num_vq_embeddings=32,
    norm_num_groups=32,
    sample_size=16,
)


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (the default inits leave some zero or one), from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def images(batch: int = 2, side: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def kl_folder(tmp_path):
    model = randomise(diffusers.AutoencoderKL(**KL_CONFIG), seed=0)
    model.save_pretrained(tmp_path / "vae", safe_serialization=True)
    return model, tmp_path / "vae"


@pytest.fixture
def vq_folder(tmp_path):
    torch.manual_seed(0)
    model = randomise(diffusers.VQModel(**VQ_CONFIG), seed=1)
    with torch.no_grad():  # codes spread like the encoder's outputs, so that several are used
        model.quantize.embedding.weight.mul_(5.0)
    model.save_pretrained(tmp_path / "vqvae", safe_serialization=True)
    return model, tmp_path / "vqvae"
