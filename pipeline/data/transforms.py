"""Image normalisation at prepare time and augmentation at load time.

Prepare fixes everything that is a property of the dataset (colour mode, background of
transparent pixels, size), so loaders never guess. Augmentations are applied per sample with
a generator passed in, so the same (seed, epoch, rank, worker, index) gives the same crop/flip.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I", "F"}


def to_color(image: Image.Image, color: Literal["gray", "rgb"], background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> 'L' or 'RGB'. Transparency is composited onto ``background``."""
    if image.mode in HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max() > 255:
            values = values / 257.0  # 16-bit range -> 8-bit
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("L" if color == "gray" else "RGB")


def _scaled(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if size == image.size:
        return image
    shrinking = size[0] < image.size[0] or size[1] < image.size[1]
    return image.resize(size, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)


def to_square(
    image: Image.Image,
    resolution: int,
    policy: Literal["center_crop", "pad", "stretch"],
    background: tuple[int, int, int],
) -> Image.Image:
    """Fit ``image`` into a ``resolution`` x ``resolution`` square by the given policy."""
    width, height = image.size
    if policy == "stretch":
        return _scaled(image, (resolution, resolution))
    if policy == "center_crop":
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = _scaled(image, size)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        return image.crop((left, top, left + resolution, top + resolution))
    scale = resolution / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    fill = background if image.mode == "RGB" else round(sum(background) / 3)
    canvas = Image.new(image.mode, (resolution, resolution), fill)
    canvas.paste(_scaled(image, size), ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
    return canvas


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL 'L'/'RGB' -> float32 (C, H, W) in [-1, 1], the range every network here expects."""
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()).float().div_(127.5).sub_(1.0)


def augment(image: torch.Tensor, generator: torch.Generator, flip: bool, crop: int | None) -> torch.Tensor:
    """Random crop to ``crop`` x ``crop`` then random horizontal flip, both from ``generator``."""
    if crop is not None:
        height, width = image.shape[-2:]
        if crop > min(height, width):
            raise ValueError(f"random crop {crop} is larger than the {height}x{width} images")
        top = int(torch.randint(height - crop + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop + 1, (1,), generator=generator))
        image = image[..., top : top + crop, left : left + crop]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.flip(-1)
    return image
