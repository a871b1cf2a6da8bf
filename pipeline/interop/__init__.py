"""Published models in and out: pretrained autoencoders (diffusers folders, LDM/taming
checkpoints), DiT checkpoints (facebookresearch/DiT, diffusers), and export to diffusers and the
DiT format. diffusers itself is the optional extra ``latentpipe[pretrained]``; see docs/interop.md."""

from pipeline.interop.dit_weights import checkpoint_config, checkpoint_sha256, load_dit
from pipeline.interop.export import (
    export_autoencoder_kl,
    export_dit_pipeline,
    export_dit_transformer,
    export_reference_dit,
    scheduler_config,
)
from pipeline.interop.pretrained import (
    PretrainedAutoencoder,
    PretrainedKL,
    PretrainedVQ,
    VQCodes,
    load_pretrained_autoencoder,
)

__all__ = [
    "PretrainedAutoencoder",
    "PretrainedKL",
    "PretrainedVQ",
    "VQCodes",
    "checkpoint_config",
    "checkpoint_sha256",
    "export_autoencoder_kl",
    "export_dit_pipeline",
    "export_dit_transformer",
    "export_reference_dit",
    "load_dit",
    "load_pretrained_autoencoder",
    "scheduler_config",
]
