"""Published autoencoders as latentpipe first stages: a diffusers ``AutoencoderKL`` / ``VQModel``
folder, or a CompVis latent-diffusion / taming checkpoint file converted to diffusers' layout.

The networks are diffusers' own modules (the optional extra ``latentpipe[pretrained]``), behind a
thin adapter that speaks what the encode, sample and evaluate code already use for the trained
kinds (pipeline.autoencoder.nets):

- KL: ``encode(x) -> DiagonalGaussian`` (posterior mean and clamped log-variance), ``decode(z)``;
- VQ: ``encode(x) -> VQCodes`` (``z_q`` and ``indices``), ``decode(z)`` without re-quantising
  (snapping is the latent space's job), ``decode_indices``, and ``codebook`` (``num_codes``,
  ``table``, ``embed``).

Each adapter also carries the downsampling factor, the channels, the checkpoint's own
``scaling_factor`` (read from its config, never assumed), and the sha256 of every weight file.
Every refusal comes before any image is encoded, with what was expected: a missing path, a folder
of another model class, a checkpoint with missing, unknown or misshapen keys (named), and, through
``check_images``, images the autoencoder cannot take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from pipeline.autoencoder.kl import DiagonalGaussian
from pipeline.errors import LatentpipeError
from pipeline.interop import ldm
from pipeline.interop.files import existing, read_state_dict, weight_hashes

AUTOENCODER_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusers_module() -> Any:
    """The diffusers package, or an error saying how to install it."""
    try:
        import diffusers
    except ImportError as error:
        raise LatentpipeError(
            "pretrained autoencoders and diffusers export need diffusers: pip install 'latentpipe[pretrained]'"
        ) from error
    return diffusers


@dataclass
class VQCodes:
    """A VQ encoding: the quantised latents (the decoder's input) and their code indices."""

    z_q: Tensor
    """(N, C, h, w) codebook vectors."""
    indices: Tensor
    """(N, h, w) long code indices."""


class PretrainedCodebook(nn.Module):
    """diffusers' ``VectorQuantizer`` seen as a codebook table: index k -> vector e_k."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer: Any = quantizer

    @property
    def table(self) -> Tensor:
        """(K, C) codebook vectors."""
        return self.quantizer.embedding.weight

    @property
    def num_codes(self) -> int:
        return self.table.shape[0]

    def embed(self, indices: Tensor) -> Tensor:
        """(N, h, w) indices -> (N, C, h, w) vectors."""
        return self.table[indices.long()].permute(0, 3, 1, 2)

    def nearest(self, z: Tensor) -> Tensor:
        """(N, C, h, w) -> (N, h, w) index of the nearest code (l2), picked by the quantizer itself."""
        _, _, (_, _, indices) = self.quantizer(z)
        return indices.view(z.shape[0], z.shape[2], z.shape[3])


class PretrainedAutoencoder(nn.Module):
    """A diffusers autoencoder and what latentpipe needs to know about it."""

    kind: Literal["kl", "vq"]

    def __init__(
        self,
        model: Any,
        *,
        source: str,
        weights: dict[str, str],
        scaling_factor: float | None,
        shift_factor: float | None = None,
    ):
        super().__init__()
        self.model: Any = model.eval().requires_grad_(False)
        self.source = source
        """Where it came from: the folder or checkpoint path."""
        self.weights = weights
        """Weight file name -> sha256."""
        self.scaling_factor = scaling_factor
        """The checkpoint's own latent scale (None when it records none)."""
        self.shift_factor = shift_factor
        """The checkpoint's own latent shift, subtracted before scaling (None: none)."""

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model.config)

    @property
    def factor(self) -> int:
        """Downsampling factor f: one stride-2 step per level but the last."""
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    def check_images(self, channels: int, resolution: int) -> None:
        """Refuse, before any batch, images this autoencoder cannot take; the message says the fix."""
        problems = []
        if channels != self.image_channels:
            color = "rgb" if self.image_channels == 3 else "gray" if self.image_channels == 1 else None
            fix = f"set data.color={color}" if color else f"give it {self.image_channels}-channel images"
            problems.append(f"it takes {self.image_channels}-channel images, the data has {channels} ({fix})")
        if resolution % self.factor:
            fit = max(self.factor, resolution // self.factor * self.factor)
            problems.append(
                f"its downsampling factor {self.factor} does not divide the image side {resolution} "
                f"(set data.resolution to a multiple of {self.factor}, e.g. {fit})"
            )
        if problems:
            raise LatentpipeError(f"the autoencoder {self.source} cannot encode these images: " + "; ".join(problems))

    def describe(self) -> dict[str, Any]:
        """The manifest entry: kind, source, geometry, own scale, weight hashes."""
        return {
            "kind": self.kind,
            "source": self.source,
            "class": type(self.model).__name__,
            "factor": self.factor,
            "image_channels": self.image_channels,
            "latent_channels": self.latent_channels,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "weights_sha256": dict(self.weights),
        }


class PretrainedKL(PretrainedAutoencoder):
    """diffusers ``AutoencoderKL``: posterior N(mean, exp(logvar)) of the latents."""

    kind = "kl"

    def encode(self, x: Tensor) -> DiagonalGaussian:
        posterior = self.model.encode(x).latent_dist
        return DiagonalGaussian(posterior.mean, posterior.logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z).sample


class PretrainedVQ(PretrainedAutoencoder):
    """diffusers ``VQModel``: latents are codebook vectors of ``vq_embed_dim`` channels."""

    kind = "vq"

    def __init__(self, model: Any, **kwargs):
        super().__init__(model, **kwargs)
        if model.config.get("lookup_from_codebook"):
            raise LatentpipeError(
                f"{self.source}: a VQModel with lookup_from_codebook=true decodes indices, "
                f"not codebook vectors; it is not supported"
            )
        self.codebook = PretrainedCodebook(model.quantize)

    @property
    def latent_channels(self) -> int:
        """The codebook vectors' width (what diffusion models), not the decoder's input width."""
        return self.codebook.table.shape[1]

    def encode(self, x: Tensor) -> VQCodes:
        z = self.model.encode(x).latents
        indices = self.codebook.nearest(z)
        return VQCodes(self.codebook.embed(indices), indices)

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z, force_not_quantize=True).sample

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.codebook.embed(indices))


ADAPTERS = {"kl": PretrainedKL, "vq": PretrainedVQ}


def _read_folder_config(folder: Path) -> tuple[str, dict]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LatentpipeError(
            f"{folder} has no config.json: expected a diffusers AutoencoderKL or VQModel "
            f"folder (save_pretrained), or an LDM checkpoint file"
        )
    config = json.loads(config_file.read_text())
    cls = config.get("_class_name")
    if cls not in AUTOENCODER_CLASSES:
        raise LatentpipeError(
            f"{folder} holds a diffusers {cls}, not an autoencoder: expected "
            f"{' or '.join(AUTOENCODER_CLASSES)} (for a pipeline folder, pass its vae/ sub-folder)"
        )
    return cls, config


def _load_folder(folder: Path) -> PretrainedAutoencoder:
    cls, config = _read_folder_config(folder)
    weights = [folder / name for name in WEIGHT_NAMES if (folder / name).is_file()]
    if not weights:
        raise LatentpipeError(f"{folder} has config.json but no weights: expected {WEIGHT_NAMES[0]}")
    model_class = getattr(diffusers_module(), cls)
    model = model_class.from_config(config)
    state = read_state_dict(weights[0])
    _check_keys(state, model.state_dict(), str(weights[0]))
    model.load_state_dict(state)
    return ADAPTERS[AUTOENCODER_CLASSES[cls]](
        model,
        source=str(folder),
        weights=weight_hashes(weights[:1]),
        scaling_factor=config.get("scaling_factor"),
        shift_factor=config.get("shift_factor"),
    )


def _check_keys(state: dict[str, Tensor], expected: dict[str, Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LatentpipeError(
            f"{where} lacks {len(missing)} key(s) its config.json needs: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise LatentpipeError(f"{where} has key(s) its config.json has no place for: {', '.join(unexpected[:8])}")
    for name, value in expected.items():
        if state[name].shape != value.shape:
            raise LatentpipeError(
                f"{where}: {name} has shape {tuple(state[name].shape)}, config.json needs {tuple(value.shape)}"
            )


def _load_ldm(path: Path, scaling_factor: float | None) -> PretrainedAutoencoder:
    tensors, prefix, own_scale = ldm.first_stage(read_state_dict(path))
    if scaling_factor is not None and own_scale is not None and scaling_factor != own_scale:
        raise LatentpipeError(f"{path} stores scale_factor={own_scale}, but scaling_factor={scaling_factor} was given")
    kind, config = ldm.diffusers_config(tensors, prefix)
    diffusers = diffusers_module()
    model = (diffusers.AutoencoderKL if kind == "kl" else diffusers.VQModel).from_config(config)
    levels = len(config["block_out_channels"])
    model.load_state_dict(ldm.to_diffusers(tensors, model.state_dict(), levels, prefix))
    return ADAPTERS[kind](
        model,
        source=str(path),
        weights=weight_hashes([path]),
        scaling_factor=own_scale if own_scale is not None else scaling_factor,
    )


def load_pretrained_autoencoder(path: str | Path, *, scaling_factor: float | None = None) -> PretrainedAutoencoder:
    """The autoencoder at ``path``: a diffusers AutoencoderKL/VQModel folder, or an LDM/taming
    checkpoint file (.safetensors, or .ckpt/.pt read weights-only).

    ``scaling_factor`` gives the latent scale of a checkpoint file that records none (an LDM
    first-stage file; the scale lives in the latent-diffusion config); a diffusers folder's
    config.json always has its own."""
    path = existing(path, "a diffusers AutoencoderKL/VQModel folder or an LDM autoencoder checkpoint file")
    if path.is_dir():
        if scaling_factor is not None:
            raise LatentpipeError(
                f"{path}: a diffusers folder has its own scaling_factor in config.json; do not pass another"
            )
        return _load_folder(path)
    return _load_ldm(path, scaling_factor)
