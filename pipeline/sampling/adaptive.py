"""Adaptive Dormand-Prince RK5(4) with per-sample step sizes, and the ``rk45`` sampler.

Dormand & Prince 1980 (Hairer, Norsett & Wanner, "Solving ODEs I", Table II.5.2), FSAL, error
norm RMS(err / (atol + rtol max(|y|, |y_new|))) and step factor 0.9 err^(-1/5) clipped to
[0.2, 10] (ibid., Sec. II.4). Each sample carries its own time and step size, so a result does
not depend on which other samples share its batch; finished samples take zero-length steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.sampling.frame import batch_sigma

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_A[6] + (0.0,), _B4))


def dopri5(
    f: Callable[[Tensor, Tensor], Tensor],
    y: Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int = 10_000,
) -> tuple[Tensor, dict]:
    """Integrate dy/dt = f(t, y) from t0 to t1 for a batch y of shape (B, n); ``f`` gets t of
    shape (B,). Returns y(t1) and {"nfe", "steps", "rejected"} (counts of batched evaluations
    and of iterations)."""
    B = y.shape[0]
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    t = torch.full((B,), float(t0), dtype=y.dtype, device=y.device)
    h = torch.full_like(t, first_step if first_step is not None else 0.01 * span)
    k1, nfe, steps, rejected = f(t, y), 1, 0, 0
    done = torch.zeros(B, dtype=torch.bool, device=y.device)
    while not bool(done.all()):
        if steps >= max_steps:
            raise RuntimeError(f"dopri5 did not reach t1 within {max_steps} steps")
        remaining = (t1 - t).abs()
        last = h >= remaining
        step = torch.where(done, 0.0, torch.minimum(h, remaining)) * direction
        ks = [k1]
        for c, a in zip(_C[1:], _A[1:]):
            y_stage = y + step[:, None] * sum(ai * k for ai, k in zip(a, ks) if ai)
            ks.append(f(t + c * step, y_stage))
        nfe += 6
        y_new = y_stage  # stage 7 is evaluated at the 5th-order solution (FSAL)
        err = step[:, None] * sum(e * k for e, k in zip(_E, ks) if e)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = (err / scale).pow(2).mean(1).sqrt()
        accept = (err_norm <= 1) | done
        rejected += int((~accept).sum())
        t = torch.where(accept & last, torch.full_like(t, float(t1)), torch.where(accept, t + step, t))
        y = torch.where(accept[:, None], y_new, y)
        k1 = torch.where(accept[:, None], ks[6], k1)
        factor = (0.9 * err_norm.clamp_min(1e-10) ** -0.2).clamp(0.2, 10.0)
        h = torch.where(done, h, step.abs() * torch.where(accept, factor, factor.clamp(max=1.0)))
        done = done | (accept & last)
        steps += 1
    return y, {"nfe": nfe, "steps": steps, "rejected": rejected}


def log_sigma_ode(denoiser, shape: tuple[int, ...]) -> Callable[[Tensor, Tensor], Tensor]:
    """The PF-ODE in u = log sigma on flattened states: dx/du = sigma dx/dsigma = x - D(x, e^u)."""

    def f(u: Tensor, y: Tensor) -> Tensor:
        x = y.reshape(shape)
        return (x - denoiser(x, batch_sigma(u.exp(), x))).reshape(y.shape)

    return f


def rk45(
    denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    info: dict | None = None,
) -> Tensor:
    """Adaptive RK45 on the PF-ODE (Song et al. 2021, Sec. 4.3 uses scipy's RK45 the same way)
    from sigmas[0] to the last positive sigma, then the denoising step to 0. Only the two end
    levels of ``sigmas`` are used. ``info`` (a dict) receives "nfe", "steps" and "rejected"."""
    sigma_end = sigmas[-2]
    y, stats = dopri5(
        log_sigma_ode(denoiser, x.shape),
        x.reshape(x.shape[0], -1),
        float(sigmas[0].log()),
        float(sigma_end.log()),
        rtol=rtol,
        atol=atol,
    )
    out = denoiser(y.reshape(x.shape), batch_sigma(sigma_end, x))
    if info is not None:
        info.update(stats, nfe=stats["nfe"] + 1)
    return out
