"""The continuous latent space the diffusion model lives in, built from the encode stage's output.

Scores are defined only for continuous data, so a VQ latent is never diffused as code indices:
each position becomes its codebook vector e_k (the decoder's input), and the diffusion model
learns the distribution of those vectors (latent score-based modelling, Vahdat et al. 2021;
Rombach et al. 2022, Sec. 3). A KL latent is a posterior sample z = mu + sigma * eps. Either way
the latents are then normalised with the statistics the encode stage measured on the train
split: per channel ((z - mean_c) / std_c) or by the single scale factor (z * scale, LDM's
convention). Generated latents go back through :meth:`LatentSpace.to_decoder`, which for VQ
optionally snaps every position to its nearest codebook vector, so the decoder sees exactly
the inputs it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from pipeline.sampling.steps import noise_like


@dataclass(frozen=True)
class LatentSpace:
    kind: Literal["vq", "kl"]
    normalize: Literal["channel", "scale"]
    shift: Tensor
    """(C,) subtracted before scaling (the channel means, or zeros for ``scale``)."""
    scale: Tensor
    """(C,) multiplied after the shift (1 / channel std, or the encode stage's scale)."""
    codebook: Tensor | None
    """(K, C) codebook vectors (VQ only)."""

    @classmethod
    def from_manifest(cls, latent: dict, normalize: str, codebook: Tensor | None) -> "LatentSpace":
        """From the encode manifest's ``latent`` entry and (VQ) its codebook table."""
        channels = latent["channels"]
        if latent["kind"] == "vq" and (codebook is None or codebook.shape[1] != channels):
            raise ValueError(f"a VQ latent space needs the (K, {channels}) codebook table")
        if normalize == "channel":
            shift = torch.tensor(latent["channel_mean"], dtype=torch.float32)
            scale = 1.0 / torch.tensor(latent["channel_std"], dtype=torch.float32).clamp_min(1e-8)
        else:
            shift = torch.zeros(channels)
            scale = torch.full((channels,), float(latent["scale"]))
        return cls(latent["kind"], normalize, shift, scale, None if codebook is None else codebook.float())

    def _view(self, t: Tensor, like: Tensor) -> Tensor:
        return t.to(like.device, like.dtype).view(1, -1, 1, 1)

    def to_model(self, z: Tensor) -> Tensor:
        """Autoencoder latents (B, C, h, w) -> the normalised space of the diffusion model."""
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def from_model(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`to_model`."""
        return x / self._view(self.scale, x) + self._view(self.shift, x)

    def embed(self, codes: Tensor) -> Tensor:
        """VQ code indices (B, h, w) -> codebook vectors (B, C, h, w)."""
        return self.codebook.to(codes.device)[codes.long()].permute(0, 3, 1, 2)

    def snap(self, z: Tensor) -> Tensor:
        """Each position of z (B, C, h, w) replaced by its nearest codebook vector (l2)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = self.codebook.to(z.device, z.dtype)
        nearest = torch.cdist(flat, codebook).argmin(1)
        return codebook[nearest].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)

    def from_batch(self, batch: dict, mirrored: Tensor | None = None,
                   generator: torch.Generator | Sequence[torch.Generator] | None = None,
                   sample_posterior: bool = True) -> Tensor:
        """A batch of the encode stage's latent shards -> normalised model-space latents.

        ``mirrored`` (B,) bool picks each sample's mirrored twin; ``generator`` draws the KL
        posterior samples (``sample_posterior=False``: the posterior means)."""
        def pick(name: str) -> Tensor:
            value = batch[name]
            if mirrored is not None:
                value = torch.where(mirrored.view(-1, *([1] * (value.dim() - 1))), batch[f"{name}_flip"], value)
            return value

        if self.kind == "vq":
            z = self.embed(pick("codes"))
        else:
            z = pick("mean").float()
            if sample_posterior:
                std = (0.5 * pick("logvar").float()).exp()
                z = z + std * noise_like(z, generator)
        return self.to_model(z)

    def to_decoder(self, x: Tensor, snap: bool) -> Tensor:
        """Model-space latents -> the autoencoder decoder's input (snapped to the codebook for VQ
        when ``snap``)."""
        z = self.from_model(x)
        return self.snap(z) if snap and self.kind == "vq" else z
