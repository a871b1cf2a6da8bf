"""The two image layouts metrics meet: stored samples and network inputs.

Sample files (the sample stage's ``samples.npz``) hold uint8 ``(N, H, W, C)``, as image files
do; every network here takes float ``(N, C, H, W)`` in [-1, 1] (pipeline.data.transforms).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_network_input(images: Tensor | np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1] (v / 127.5 - 1); a float
    (N, C, H, W) batch is taken to be in that range already and returned as float32."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (4 dimensions), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 (N, H, W, C) or float (N, C, H, W), got {images.dtype}")
    return images.float()


def to_uint8(images: Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), rounding as PIL would store it (the
    inverse of :func:`as_network_input` up to that rounding)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
