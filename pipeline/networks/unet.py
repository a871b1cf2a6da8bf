"""U-Net denoiser in the style of ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on
Image Synthesis", sec. 3) as used by LDM (Rombach et al. 2022) on latents.

Residual blocks receive the time (+ class) embedding through scale-shift normalisation
(GroupNorm(h) * (1 + scale) + shift, ADM sec. 3 "adaptive group normalization"), self-attention
runs at the configured feature-map resolutions, each level has its channel multiplier, skip
connections join the encoder and decoder, and every residual branch ends in a zero-initialised
convolution so each block starts as the identity (or its skip projection).

The architecture is described once by :func:`unet_layout`, a list of block specs; the
constructor builds modules from it and :mod:`pipeline.networks.flops` counts FLOPs from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.networks.embeddings import ConditionEmbedder
from pipeline.networks.layers import SelfAttention, Upsample, check_backend, run_block


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    input_size: int = 32
    """Side length of the square latent the network sees (H = W)."""
    in_channels: int = 4
    """Latent channels."""
    model_channels: int = 128
    """Channels of the first level; level i has model_channels * channel_mult[i]."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    """Channel multiplier per resolution level; each level after the first halves the resolution."""
    num_res_blocks: int = 2
    """Residual blocks per level in the encoder (the decoder has one more, for the extra skip)."""
    attention_resolutions: tuple[int, ...] = (16,)
    """Feature-map side lengths at which a self-attention block follows each residual block."""
    num_head_channels: int = 64
    """Channels per attention head (heads = channels // num_head_channels, at least one)."""
    dropout: float = 0.0
    """Dropout inside residual blocks, before their last convolution."""
    num_classes: int = 0
    """Number of class labels; 0 makes the network unconditional. One more row is the null class."""
    learn_sigma: bool = False
    """Also output the per-pixel variance interpolation v (Nichol & Dhariwal 2021): 2C outputs."""
    norm_groups: int = 32
    """GroupNorm groups; must divide every block's channel count."""
    attention_backend: str = "sdpa"
    """'sdpa', 'xformers' (optional extra) or 'math'; see pipeline.networks.layers."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    channels_last: bool = True
    """On CUDA, feed the convolutions channels-last (NHWC) activations (faster cuDNN kernels).
    ``net.to(memory_format=torch.channels_last)`` also converts the weights once, sparing cuDNN
    a per-call weight copy."""

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if levels < 1 or self.input_size % 2 ** (levels - 1):
            raise ValueError(f"input_size {self.input_size} cannot be halved {levels - 1} times (channel_mult)")
        check_backend(self.attention_backend)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def embed_dim(self) -> int:
        """Width of the time/class embedding (4 x model_channels, as in ADM)."""
        return 4 * self.model_channels


# Presets per latent side, shaped after ADM's and LDM's published configurations (not their
# exact models): wider and deeper as the latent grows, attention at the coarser resolutions.
UNET_PRESETS = {
    "8x8": dict(input_size=8, model_channels=128, channel_mult=(1, 2), attention_resolutions=(8, 4)),
    "16x16": dict(input_size=16, model_channels=128, channel_mult=(1, 2, 2), attention_resolutions=(8, 4)),
    "32x32": dict(input_size=32, model_channels=192, channel_mult=(1, 2, 4), attention_resolutions=(16, 8)),
    "64x64": dict(input_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), attention_resolutions=(32, 16, 8)),
}


@dataclass(frozen=True)
class Res:
    """Residual block from ``cin`` to ``cout`` channels at ``size`` x ``size``."""

    cin: int
    cout: int
    size: int


@dataclass(frozen=True)
class Attn:
    """Self-attention block over ``channels`` at ``size`` x ``size`` (size^2 tokens)."""

    channels: int
    size: int


@dataclass(frozen=True)
class Down:
    """Stride-2 3x3 convolution from ``size`` to ``size // 2``."""

    channels: int
    size: int


@dataclass(frozen=True)
class Up:
    """Nearest 2x upsampling from ``size`` to ``2 * size``, then a 3x3 convolution."""

    channels: int
    size: int


Spec = Res | Attn | Down | Up


@dataclass(frozen=True)
class UNetLayout:
    stem_channels: int
    encoder: list[list[Spec]]
    middle: list[Spec]
    decoder: list[list[Spec]]


def unet_layout(config: UNetConfig) -> UNetLayout:
    """The block specs of the U-Net, in execution order (ADM's ``UNetModel`` construction loop)."""
    mc, size = config.model_channels, config.input_size
    ch = mc * config.channel_mult[0]
    skips = [ch]
    encoder: list[list[Spec]] = []
    last = len(config.channel_mult) - 1
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            group: list[Spec] = [Res(ch, mc * mult, size)]
            ch = mc * mult
            if size in config.attention_resolutions:
                group.append(Attn(ch, size))
            encoder.append(group)
            skips.append(ch)
        if level != last:
            encoder.append([Down(ch, size)])
            size //= 2
            skips.append(ch)
    middle: list[Spec] = [Res(ch, ch, size), Attn(ch, size), Res(ch, ch, size)]
    decoder: list[list[Spec]] = []
    for level, mult in reversed(list(enumerate(config.channel_mult))):
        for i in range(config.num_res_blocks + 1):
            group = [Res(ch + skips.pop(), mc * mult, size)]
            ch = mc * mult
            if size in config.attention_resolutions:
                group.append(Attn(ch, size))
            if level and i == config.num_res_blocks:
                group.append(Up(ch, size))
                size *= 2
            decoder.append(group)
    return UNetLayout(mc * config.channel_mult[0], encoder, middle, decoder)


def num_heads(channels: int, head_channels: int) -> int:
    return max(channels // head_channels, 1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, scale-shift norm from the embedding, SiLU-dropout-conv(zero), + skip."""

    def __init__(self, cin: int, cout: int, embed_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(embed_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        for param in self.conv2.parameters():  # weight and bias
            nn.init.zeros_(param)

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        """``emb_act`` is SiLU(embedding), computed once for all blocks by the caller."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb_act)[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class AttentionBlock(nn.Module):
    """GroupNorm, multi-head self-attention over the H*W positions, zero-initialised projection."""

    def __init__(self, channels: int, heads: int, groups: int, backend: str):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = SelfAttention(channels, heads, backend=backend)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Conv2d):
    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, stride=2, padding=1)


class Group(nn.ModuleList):
    """Blocks run one after another; residual blocks also receive the embedding."""

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        for block in self:
            x = block(x, emb_act) if isinstance(block, ResBlock) else block(x)
        return x


class UNet(nn.Module):
    """``net(x, t, y=None) -> out``, with the same contract as :class:`pipeline.networks.dit.DiT`.

    x: (B, in_channels, input_size, input_size). t: (B,) or scalar float time input. y: (B,)
    long labels in [0, num_classes] (num_classes = null class) or None (all null / unconditional).
    out: (B, out_channels, input_size, input_size).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        layout = unet_layout(config)
        self.cond = ConditionEmbedder(
            config.embed_dim, num_classes=config.num_classes, frequency_dim=config.model_channels
        )
        self.stem = nn.Conv2d(config.in_channels, layout.stem_channels, 3, padding=1)
        self.encoder = nn.ModuleList(Group(self._block(s) for s in group) for group in layout.encoder)
        self.middle = Group(self._block(s) for s in layout.middle)
        self.decoder = nn.ModuleList(Group(self._block(s) for s in group) for group in layout.decoder)
        self.head_norm = nn.GroupNorm(config.norm_groups, layout.stem_channels)
        self.head = nn.Conv2d(layout.stem_channels, config.out_channels, 3, padding=1)
        for param in self.head.parameters():  # weight and bias
            nn.init.zeros_(param)

    def _block(self, spec: Spec) -> nn.Module:
        cfg = self.config
        if isinstance(spec, Res):
            return ResBlock(spec.cin, spec.cout, cfg.embed_dim, cfg.dropout, cfg.norm_groups)
        if isinstance(spec, Attn):
            heads = num_heads(spec.channels, cfg.num_head_channels)
            return AttentionBlock(spec.channels, heads, cfg.norm_groups, cfg.attention_backend)
        if isinstance(spec, Down):
            return Downsample(spec.channels)
        return Upsample(spec.channels)

    @property
    def null_class(self) -> int | None:
        """Label index that means "no class" (classifier-free guidance); None if unconditional."""
        return self.cond.null_class

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb_act = F.silu(self.cond(t, y, x.shape[0]))
        if self.config.channels_last and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        checkpoint = self.gradient_checkpointing
        h = self.stem(x)
        skips = [h]
        for group in self.encoder:
            h = run_block(group, h, emb_act, checkpoint=checkpoint)
            skips.append(h)
        h = run_block(self.middle, h, emb_act, checkpoint=checkpoint)
        for group in self.decoder:
            h = run_block(group, torch.cat([h, skips.pop()], dim=1), emb_act, checkpoint=checkpoint)
        return self.head(F.silu(self.head_norm(h)))
