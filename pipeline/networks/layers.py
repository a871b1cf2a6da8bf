"""Attention with interchangeable backends, the self-attention layer built on it, block checkpointing.

``attention(q, k, v, backend=...)`` computes softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017,
eq. 1) for tensors laid out as (batch, heads, tokens, head_dim). Backends:

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``. On GPU it picks
  the flash / memory-efficient / cuDNN kernels, which accumulate logits and softmax in fp32;
  its math fallback upcasts fp16/bf16 to fp32 as long as
  ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp`` is left at its default (False).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (optional extra
  ``latentpipe[xformers]``); listed by :func:`available_backends` only when importable.
- ``"math"``: the reference. Logits, softmax and the weighted sum are computed in fp32 and
  the result is cast back, so fp16 logits beyond 65504 never become inf/NaN.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

BACKENDS = ("sdpa", "xformers", "math")


def available_backends() -> tuple[str, ...]:
    """The backends that can run in this environment (xformers only when it is installed)."""
    has_xformers = importlib.util.find_spec("xformers") is not None
    return tuple(b for b in BACKENDS if b != "xformers" or has_xformers)


def check_backend(backend: str) -> None:
    """Raise a ValueError naming ``backend`` if it is unknown or not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend not in available_backends():
        raise ValueError(f"attention backend {backend!r} needs the optional extra: pip install 'latentpipe[xformers]'")


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    wide = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays fp64
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q.to(wide), k.to(wide).transpose(-2, -1)) * scale
    return torch.matmul(logits.softmax(dim=-1), v.to(wide)).to(q.dtype)


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    import xformers.ops as xops  # optional extra, imported only when asked for

    # xformers lays tensors out as (batch, tokens, heads, head_dim).
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over (batch, heads, tokens, head_dim) tensors."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return _math_attention(q, k, v)
    if backend == "xformers":
        return _xformers_attention(q, k, v)
    raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")


class SelfAttention(nn.Module):
    """Multi-head self-attention over (batch, tokens, dim): fused qkv projection, output projection."""

    def __init__(self, dim: int, num_heads: int, *, backend: str = "sdpa", qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        check_backend(backend)
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def run_block(block: nn.Module, *args: Tensor, checkpoint: bool) -> Tensor:
    """Call ``block(*args)``, recomputing its activations in backward when ``checkpoint`` is set.

    Non-reentrant activation checkpointing (Chen et al. 2016) with the RNG state preserved, so
    dropout draws the same mask in the recomputation and gradients equal the plain model's.
    """
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (the DDPM/ADM and VQGAN up-sampling layer)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
