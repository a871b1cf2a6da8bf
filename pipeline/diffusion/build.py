"""From the diffusion config section to the library's objects: process, loss, network, grid.

Kept out of the stages so that training, sampling and evaluation build exactly the same
process and network from the same config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pipeline import seeding
from pipeline.diffusion import losses
from pipeline.diffusion.process import Process
from pipeline.diffusion.schedules import DDPM, VE, VP, SubVP
from pipeline.networks import build_denoiser
from pipeline.sampling.grids import karras_sigmas

LOSSES: dict[str, Callable[..., Tensor]] = {
    "eps": losses.eps_loss,  # L_simple, Ho et al. 2020 eq. 14
    "x0": losses.x0_loss,
    "v": losses.v_loss,  # Salimans & Ho 2022
    "score": losses.dsm_loss,  # denoising score matching, Song et al. 2021 eq. 7
}


def build_loss(cfg) -> Callable[..., Tensor]:
    """The training loss of ``cfg`` (a DiffusionConfig): its prediction target's loss under its
    weighting across noise levels."""
    loss = LOSSES[cfg.prediction]
    if cfg.loss_weighting == "min_snr":
        return functools.partial(loss, weighting=losses.min_snr(cfg.min_snr_gamma, cfg.prediction))
    return loss


def build_process(cfg) -> Process:
    """The forward process of ``cfg`` (a DiffusionConfig)."""
    if cfg.process == "ddpm":
        return DDPM.linear(cfg.timesteps) if cfg.beta_schedule == "linear" else DDPM.cosine(cfg.timesteps)
    if cfg.process == "ve":
        return VE(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    return (VP if cfg.process == "vp" else SubVP)(beta_min=cfg.beta_min, beta_max=cfg.beta_max)


def sigma_range(process: Process) -> tuple[float, float]:
    """(sigma_min, sigma_max) in the VE frame: the smallest and largest noise level trained on."""
    return float(process.sigma_ve(process.t_min)), float(process.sigma_ve(process.t_max))


def sampling_sigmas(process: Process, grid: str, steps: int) -> Tensor:
    """A descending grid of ``steps`` noise levels ending at 0: Karras et al.'s rho = 7 spacing
    over the process's range (EDM eq. 5) or the process's own (DDPM timesteps, SDE times)."""
    if grid == "karras":
        return karras_sigmas(*sigma_range(process), steps)
    return process.sigmas(steps)


def build_network(cfg, channels: int, resolution: int, num_classes: int) -> nn.Module:
    """The configured backbone for (channels, resolution, resolution) latents."""
    network = cfg.network_config(channels=channels, resolution=resolution, num_classes=num_classes)
    return build_denoiser(cfg.backbone, **dataclasses.asdict(network))


def drop_labels(labels: Tensor, probability: float, null_class: int, generator: torch.Generator) -> Tensor:
    """Labels with each replaced by the null class with ``probability`` (classifier-free
    guidance training, Ho & Salimans 2022, Algorithm 1)."""
    dropped = seeding.rand(labels.shape, generator, device=labels.device) < probability
    return torch.where(dropped, torch.full_like(labels, null_class), labels)
