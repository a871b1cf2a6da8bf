"""Denoiser backbones: DiT (adaLN-Zero) and an ADM-style U-Net, with a shared contract.

Every network is called as ``net(x, t, y=None)``:

- ``x``: (B, in_channels, input_size, input_size) latents;
- ``t``: (B,) or scalar float *time input* of the network itself (a step index, c_noise(sigma),
  ... whatever the denoiser wrapper of ``pipeline.diffusion`` chooses; networks know nothing
  about schedules);
- ``y``: (B,) long class labels in [0, num_classes], where index ``num_classes`` (also
  ``net.null_class``) is the null class of classifier-free guidance; None = all null. An
  unconditional network (num_classes=0) takes y=None only;
- returns (B, out_channels, input_size, input_size), out_channels = 2 * in_channels with
  ``learn_sigma`` (prediction first, then the variance output), else in_channels.

Build one from a preset and keyword overrides::

    net = build_denoiser(kind="dit", preset="S/2", in_channels=4, input_size=32, num_classes=10)
    net = build_denoiser(kind="unet", preset="32x32", in_channels=4, num_classes=0)

``net.config`` is the resolved frozen config; ``pipeline.networks.flops.training_flops(net.config)``
gives the per-sample training FLOPs for MFU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from pipeline.networks.dit import DIT_PRESETS, DiT, DiTConfig
from pipeline.networks.flops import forward_flops, mfu, training_flops
from pipeline.networks.layers import BACKENDS, attention, available_backends
from pipeline.networks.unet import UNET_PRESETS, UNet, UNetConfig

NetworkKind = tuple[type[DiTConfig] | type[UNetConfig], Mapping[str, Mapping[str, Any]], type[nn.Module]]
"""(config class, named presets of its fields, network class built from that config)."""

KINDS: dict[str, NetworkKind] = {"dit": (DiTConfig, DIT_PRESETS, DiT), "unet": (UNetConfig, UNET_PRESETS, UNet)}


def denoiser_config(kind: str, preset: str | None = None, **options) -> DiTConfig | UNetConfig:
    """The frozen config of a ``kind`` network: the preset's fields, then ``options`` on top."""
    if kind not in KINDS:
        raise ValueError(f"network kind {kind!r} is not one of {sorted(KINDS)}")
    config_cls, presets, _ = KINDS[kind]
    if preset is not None and preset not in presets:
        raise ValueError(f"{kind} preset {preset!r} is not one of {sorted(presets)}")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown {kind} option(s) {unknown}; known: {sorted(fields)}")
    return config_cls(**{**(presets[preset] if preset else {}), **options})


def build_denoiser(kind: str, preset: str | None = None, **options) -> nn.Module:
    """A freshly initialised network; see :func:`denoiser_config` for the arguments."""
    config = denoiser_config(kind, preset, **options)
    return KINDS[kind][2](config)


__all__ = [
    "BACKENDS",
    "DIT_PRESETS",
    "UNET_PRESETS",
    "DiT",
    "DiTConfig",
    "UNet",
    "UNetConfig",
    "attention",
    "available_backends",
    "build_denoiser",
    "denoiser_config",
    "forward_flops",
    "mfu",
    "training_flops",
]
