"""Conditioning embeddings shared by the DiT and the U-Net: time, class label, 2-D position."""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of a float time input, shape (batch,) -> (batch, dim).

    Transformer position encoding (Vaswani et al. 2017, sec. 3.5) applied to the time input as in
    DDPM (Ho et al. 2020, appendix B) and ADM's ``timestep_embedding``: [cos(t w_i), sin(t w_i)]
    with w_i = max_period^(-i / (dim/2)). ``t`` may be any real number (a step index, log-sigma...).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding width must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, shape (height * width, dim), row-major tokens.

    Half of the channels encode the row, half the column, each with the 1-D sin-cos encoding
    (MAE, He et al. 2022; used unchanged by DiT, Peebles & Xie 2023, sec. 3.2).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # Column (x) first, then row (y): the channel order of MAE's / DiT's reference code.
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Float time input -> sinusoidal features -> MLP (Linear, SiLU, Linear)."""

    def __init__(self, dim: int, *, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = Mlp(frequency_dim, dim, dim, act_layer=nn.SiLU)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.frequency_dim).to(self.mlp.fc1.weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector, with one extra row: the null class used for classifier-free guidance.

    The null class has index ``num_classes`` (Ho & Salimans 2022). Label dropout during training
    is the training stage's job: it replaces labels by :attr:`null_class` with its own generator.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: Tensor | None, batch: int) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.null_class, dtype=torch.long, device=self.table.weight.device)
        return self.table(y)


class ConditionEmbedder(nn.Module):
    """c = embed(t) + embed(y): the conditioning vector of both the DiT and the U-Net.

    ``t`` is (batch,) or a scalar broadcast over the batch. ``y`` is (batch,) labels, or None for
    "all null" in a class-conditional network; an unconditional one (num_classes=0) rejects labels.
    """

    def __init__(self, dim: int, *, num_classes: int, frequency_dim: int = 256):
        super().__init__()
        self.time = TimestepEmbedder(dim, frequency_dim=frequency_dim)
        self.label = LabelEmbedder(num_classes, dim) if num_classes else None

    @property
    def null_class(self) -> int | None:
        """Label index that means "no class" (classifier-free guidance); None if unconditional."""
        return None if self.label is None else self.label.null_class

    def forward(self, t: Tensor, y: Tensor | None, batch: int) -> Tensor:
        c = self.time(t.expand(batch) if t.dim() == 0 else t)
        if self.label is not None:
            return c + self.label(y, batch)
        if y is not None:
            raise ValueError("the network is unconditional (num_classes=0) but got class labels y")
        return c
