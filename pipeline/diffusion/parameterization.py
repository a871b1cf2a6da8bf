"""One denoiser contract: ``D(x, sigma, **cond) -> x0_hat`` in the variance-exploding frame.

x = x_0 + sigma * eps (EDM, Karras et al. 2022, eq. 2). A network trained under any process
predicts eps, x_0, v or the score at its own input x_t = alpha_t x and its own time input;
:class:`Denoiser` maps sigma to both (``process.input_scale`` / ``process.network_time``), so
networks know nothing about schedules and samplers know nothing about networks. The functions
below go back from D to eps, score and v.

With x_t = alpha x_0 + s x_eps (s = sigma_t = alpha * sigma):
- eps:   D = x - sigma * eps_theta                       (EDM Table 1, "VP/VE" columns)
- x0:    D = x0_theta
- v:     v = alpha eps - s x_0 (Salimans & Ho 2022, Sec. 4), so
         D = (alpha x_t - s v_theta) / (alpha^2 + s^2)
- score: s_theta(x_t, t) ~ grad_{x_t} log p_t; Tweedie's formula in the VE frame
         D = x + sigma^2 * alpha * s_theta  (Efron 2011; Song et al. 2021, eq. 6)
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

__all__ = ["Denoiser", "batch_sigma", "eps_from_denoised", "score_from_denoised", "v_from_denoised"]

Prediction = Literal["eps", "x0", "v", "score"]


def batch_sigma(sigma, x: Tensor) -> Tensor:
    """``sigma`` as a (B, 1, ..., 1) tensor in x's dtype/device (from a scalar, (B,) or (B, 1...))."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() > 0 and s.shape[0] == x.shape[0]:
        s = s.reshape(x.shape[0])
    return s.expand(x.shape[0]).reshape(x.shape[0], *([1] * (x.dim() - 1)))


def eps_from_denoised(x: Tensor, sigma, denoised: Tensor) -> Tensor:
    """eps_hat = (x - D) / sigma."""
    return (x - denoised) / batch_sigma(sigma, x)


def score_from_denoised(x: Tensor, sigma, denoised: Tensor) -> Tensor:
    """grad_x log p_sigma(x) = (D - x) / sigma^2 in the VE frame (Tweedie)."""
    return (denoised - x) / batch_sigma(sigma, x) ** 2


def v_from_denoised(x: Tensor, sigma, denoised: Tensor, alpha) -> Tensor:
    """v = alpha eps - sigma_t x_0 at x_t = alpha x (Salimans & Ho 2022)."""
    s = batch_sigma(sigma, x)
    a = batch_sigma(alpha, x)
    return a * (x - denoised) / s - a * s * denoised


class Denoiser:
    """Turn ``net(x_t, t, **cond)`` predicting eps / x0 / v / score under ``process`` into D.

    ``process`` supplies ``input_scale(sigma)`` (alpha_t) and ``network_time(sigma)``; pass
    ``time`` to override the latter (e.g. a network conditioned on log sigma).
    """

    def __init__(self, net: Callable[..., Tensor], process, prediction: Prediction = "eps",
                 time: Callable[[Tensor], Tensor] | None = None):
        if prediction not in ("eps", "x0", "v", "score"):
            raise ValueError(f"prediction must be eps, x0, v or score, got {prediction!r}")
        self.net, self.process, self.prediction = net, process, prediction
        self.time = time or process.network_time

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        s = batch_sigma(sigma, x)
        a = self.process.input_scale(s).to(x.dtype)
        out = self.net(a * x, self.time(s.reshape(-1)), **cond)
        if self.prediction == "eps":
            return x - s * out
        if self.prediction == "x0":
            return out
        if self.prediction == "v":
            st = a * s
            return (a * (a * x) - st * out) / (a * a + st * st)
        return x + s * s * a * out
