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

Device: :meth:`LatentSpace.from_batch` takes a latent batch as stored (int16 codes, fp16
mean/logvar), already on the compute device (a trainer copies it there pinned and
non-blocking: 2 bytes per value instead of 4, and C times fewer for VQ codes) and does the
embedding / posterior sample there. :meth:`LatentSpace.to` moves the small tables once, so no
step copies them again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pipeline import seeding


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
    def from_manifest(
        cls, latent: dict, normalize: Literal["channel", "scale"], codebook: Tensor | None
    ) -> LatentSpace:
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

    def to(self, device: str | torch.device) -> LatentSpace:
        """The same space with its tables (shift, scale, codebook) on ``device``."""
        codebook = None if self.codebook is None else self.codebook.to(device)
        return dataclasses.replace(self, shift=self.shift.to(device), scale=self.scale.to(device), codebook=codebook)

    def _view(self, t: Tensor, like: Tensor) -> Tensor:
        return t.to(like.device, like.dtype).view(1, -1, 1, 1)

    def to_model(self, z: Tensor) -> Tensor:
        """Autoencoder latents (B, C, h, w) -> the normalised space of the diffusion model."""
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def from_model(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`to_model`."""
        return x / self._view(self.scale, x) + self._view(self.shift, x)

    def _vq_codebook(self) -> Tensor:
        if self.codebook is None:
            raise ValueError("a KL latent space has no codebook to embed codes or snap to")
        return self.codebook

    def embed(self, codes: Tensor) -> Tensor:
        """VQ code indices (B, h, w), any integer dtype -> codebook vectors (B, C, h, w) on the codes'
        device."""
        return self._vq_codebook().to(codes.device)[codes.long()].permute(0, 3, 1, 2)

    def snap(self, z: Tensor) -> Tensor:
        """Each position of z (B, C, h, w) replaced by its nearest codebook vector (l2)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = self._vq_codebook().to(z.device, z.dtype)
        nearest = torch.cdist(flat, codebook).argmin(1)
        return codebook[nearest].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)

    def from_batch(
        self,
        batch: dict,
        mirrored: Tensor | None = None,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
    ) -> Tensor:
        """A batch of the encode stage's latent shards, as stored, -> normalised model-space
        latents (float32) on the batch's device.

        ``mirrored`` (B,) bool, on any device, picks each sample's mirrored twin; ``generator``
        (on any device) draws the KL posterior samples (``sample_posterior=False``: the
        posterior means)."""

        def pick(name: str) -> Tensor:
            value = batch[name]
            if mirrored is not None:
                chosen = mirrored.to(value.device, non_blocking=True).view(-1, *([1] * (value.dim() - 1)))
                value = torch.where(chosen, batch[f"{name}_flip"], value)
            return value

        if self.kind == "vq":
            z = self.embed(pick("codes"))
        else:
            z = pick("mean").float()
            if sample_posterior:
                std = (0.5 * pick("logvar").float()).exp()
                z = z + std * seeding.randn(z.shape, generator, device=z.device)
        return self.to_model(z)

    def to_decoder(self, x: Tensor, snap: bool) -> Tensor:
        """Model-space latents -> the autoencoder decoder's input (snapped to the codebook for VQ
        when ``snap``)."""
        z = self.from_model(x)
        return self.snap(z) if snap and self.kind == "vq" else z


def point_latent(encoded, kind: str) -> Tensor:
    """The one latent ``autoencoder.encode(x)`` stands for outside training, as the decoder reads
    it: a VQ's codebook vectors z_q, a KL posterior's mean (``kind``: the latent's kind)."""
    return encoded.z_q if kind == "vq" else encoded.mean
