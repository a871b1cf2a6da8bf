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
- score: the network output o is the score scaled by the marginal std, s_theta = o / s
         (score_sde's ``get_score_fn``: the net's output is divided by the std, so it stays O(1)
         where the score itself is O(1/s), up to 1e6 for sub-VP at t_min); Tweedie's formula in
         the VE frame D = x + sigma^2 alpha s_theta (Efron 2011; Song et al. 2021, eq. 6)
         then gives D = x + sigma * o (o ~ -eps: the score net is an eps net of opposite sign).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

from pipeline.diffusion.process import Process
from pipeline.sampling.frame import batch_sigma

__all__ = ["Denoiser", "eps_from_denoised", "score_from_denoised", "v_from_denoised"]

Prediction = Literal["eps", "x0", "v", "score"]


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

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: Process,
        prediction: Prediction = "eps",
        time: Callable[[Tensor], Tensor] | None = None,
    ):
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
        return x + s * out  # = x + sigma^2 alpha (out / (alpha sigma)), the std-scaled score
