"""The process contract: what training, the denoiser wrapper and the sampling grids need from a
forward process, as a structural type (every class of :mod:`pipeline.diffusion.schedules`
satisfies it; code switches on these members, never on the class)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Process"]


@runtime_checkable
class Process(Protocol):
    """A forward process x_t = alpha_t x_0 + sigma_t eps seen in the VE frame sigma = sigma_t / alpha_t.

    Times run over [``t_min``, ``t_max``]: integer indices for the discrete processes (DDPM
    timesteps, NCSN levels), continuous for the SDEs.
    """

    @property
    def t_min(self) -> float:
        """The smallest time (trained on)."""
        ...

    @property
    def t_max(self) -> float:
        """The largest time (trained on)."""
        ...

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) of q(x_t | x_0)."""
        ...

    def sigma_ve(self, t) -> Tensor:
        """The VE noise level sigma_t / alpha_t of time t."""
        ...

    def t_of_sigma(self, sigma) -> Tensor:
        """The process time of a VE noise level (nearest index for discrete processes)."""
        ...

    def input_scale(self, sigma: Tensor) -> Tensor:
        """The network's input scale at VE level sigma (it sees input_scale * x): alpha_t, or EDM's
        c_in for VE and NCSN (pipeline.diffusion.schedules)."""
        ...

    def network_time(self, sigma: Tensor) -> Tensor:
        """The time input of the network at VE level sigma, the same in training and sampling."""
        ...

    def training_sigmas(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """n VE noise levels drawn for training (float64, on ``device``)."""
        ...

    def sigmas(self, n: int) -> Tensor:
        """The process's own sampling grid of n levels: descending, float64, ending at 0."""
        ...
