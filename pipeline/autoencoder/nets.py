"""Convolutional ResNet encoder/decoder of the VQGAN / LDM first-stage autoencoders (Esser et
al. 2021, "Taming Transformers", Fig. 2 and App. B; Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", App. G), and the two autoencoders built from them.

Encoder: conv_in -> per level (channel multiplier m_i): ``num_res_blocks`` residual blocks
(GroupNorm + SiLU + 3x3 conv, twice) then a stride-2 downsampling (not after the last level)
-> middle: block, self-attention, block (the lowest resolution) -> GroupNorm + SiLU + conv_out.
The decoder mirrors it with ``num_res_blocks + 1`` blocks per level and nearest-neighbour
upsampling. With L = len(channel_mult) levels the downsampling factor is f = 2^(L - 1),
f in {2, 4, 8, 16}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.autoencoder.codebook import Codebook, Quantized
from pipeline.autoencoder.kl import DiagonalGaussian
from pipeline.networks.layers import Upsample

FACTORS = (2, 4, 8, 16)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(
            f"norm_groups={groups} does not divide {channels} channels; choose "
            f"base channels and multipliers that are multiples of norm_groups"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv on the skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H x W positions (Vaswani et al. 2017, Eq. 1)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (n, 1, hw, c)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric (right/bottom) zero padding, as in LDM."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _middle(channels: int, groups: int, dropout: float, attention: bool) -> nn.Sequential:
    return nn.Sequential(
        ResnetBlock(channels, channels, groups, dropout),
        AttnBlock(channels, groups) if attention else nn.Identity(),
        ResnetBlock(channels, channels, groups, dropout),
    )


def _check_levels(channel_mult: tuple[int, ...]) -> int:
    factor = 2 ** (len(channel_mult) - 1)
    if factor not in FACTORS:
        raise ValueError(
            f"channel_mult {tuple(channel_mult)} gives downsampling factor {factor}; use 2 to 5 levels (f in {FACTORS})"
        )
    return factor


class Encoder(nn.Module):
    """Image (N, in_channels, H, W) -> (N, out_channels, H/f, W/f)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attention: bool = True,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_channels, self.factor = in_channels, _check_levels(channel_mult)
        widths = [channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        layers: list[nn.Module] = []
        c = channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(c, width, norm_groups, dropout))
                c = width
            if level < len(widths) - 1:
                layers.append(Downsample(c))
        self.down = nn.Sequential(*layers)
        self.mid = _middle(c, norm_groups, dropout, attention)
        self.norm_out = _norm(c, norm_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(
                f"images of shape {tuple(x.shape[1:])} do not fit this autoencoder: it expects "
                f"{self.in_channels} channel(s) and height/width divisible by f={self.factor}; "
                f"fix the data's channels/resolution or the autoencoder's in_channels/channel_mult"
            )
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (N, in_channels, h, w) -> image (N, out_channels, h*f, w*f)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attention: bool = True,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.factor = _check_levels(channel_mult)
        widths = [channels * m for m in channel_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.mid = _middle(c, norm_groups, dropout, attention)
        layers: list[nn.Module] = []
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(c, width, norm_groups, dropout))
                c = width
            if level > 0:
                layers.append(Upsample(c))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(c, norm_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv: the G_L of the VQGAN adaptive weight."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQAutoencoder(nn.Module):
    """x -> Encoder -> Codebook (straight-through) -> Decoder. The encoder emits the codebook's
    ``dim`` channels."""

    def __init__(self, encoder: Encoder, decoder: Decoder, codebook: Codebook):
        super().__init__()
        self.encoder, self.decoder, self.codebook = encoder, decoder, codebook

    def encode(self, x: Tensor) -> Quantized:
        return self.codebook(self.encoder(x))

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decoder(self.codebook.embed(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, Quantized]:
        q = self.encode(x)
        return self.decode(q.z_q), q


class KLAutoencoder(nn.Module):
    """x -> Encoder (2 x latent channels: mean, log-variance) -> z ~ q(z|x) -> Decoder.

    ``log_scale`` is the learned log standard deviation of the Gaussian decoder p(x|z) =
    N(D(z), exp(log_scale)^2 I) used by :func:`pipeline.autoencoder.kl.gaussian_nll` (LDM's
    learned ``logvar``).
    """

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.log_scale = nn.Parameter(torch.zeros(()))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, *, generator: torch.Generator | None) -> tuple[Tensor, DiagonalGaussian]:
        """Decodes a reparameterised sample drawn with ``generator``, or the posterior mean
        when ``generator`` is None (evaluation)."""
        q = self.encode(x)
        return self.decode(q.mean if generator is None else q.sample(generator)), q
