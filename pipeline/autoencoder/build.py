"""The autoencoder described by an ``AutoencoderConfig``: one builder for training and for
every later stage that loads the trained weights."""

from __future__ import annotations

from typing import TypedDict

from pipeline.autoencoder.codebook import Codebook, Collective, single_process
from pipeline.autoencoder.nets import Decoder, Encoder, KLAutoencoder, VQAutoencoder
from pipeline.config import AutoencoderConfig


class _Trunk(TypedDict):
    """The keyword arguments Encoder and Decoder share."""

    channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention: bool
    norm_groups: int
    dropout: float


def build_autoencoder(
    cfg: AutoencoderConfig,
    image_channels: int,
    *,
    seed: int = 0,
    all_reduce: Collective = single_process,
    all_gather: Collective = single_process,
) -> VQAutoencoder | KLAutoencoder:
    trunk = _Trunk(
        channels=cfg.channels,
        channel_mult=cfg.channel_mult,
        num_res_blocks=cfg.num_res_blocks,
        attention=cfg.attention,
        norm_groups=cfg.norm_groups,
        dropout=cfg.dropout,
    )
    latent = cfg.latent_channels
    decoder = Decoder(in_channels=latent, out_channels=image_channels, **trunk)
    if cfg.kind == "kl":
        return KLAutoencoder(Encoder(in_channels=image_channels, out_channels=2 * latent, **trunk), decoder)
    codebook = Codebook(
        cfg.num_codes,
        latent,
        lookup_dim=cfg.lookup_dim,
        ema=cfg.codebook_ema,
        decay=cfg.codebook_decay,
        beta=cfg.commitment_beta,
        cosine=cfg.cosine_codes,
        kmeans_batches=1 if cfg.kmeans_init else 0,
        dead_after=cfg.dead_code_steps,
        seed=seed,
        all_reduce=all_reduce,
        all_gather=all_gather,
    )
    return VQAutoencoder(Encoder(in_channels=image_channels, out_channels=latent, **trunk), decoder, codebook)
