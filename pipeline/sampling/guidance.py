"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a denoiser wrapper.

eps~ = eps_u + w (eps_c - eps_u) is affine in eps and D = x - sigma eps, so the same combination
holds for D: D~ = D_u + w (D_c - D_u). w = 1 is the conditional model, w = 0 the unconditional
one (diffusers' ``guidance_scale``; the paper's w is this w - 1). Both branches run in one
batched call: the batch is doubled, conditional half first.

With ``interval`` = (sigma_lo, sigma_hi), guidance is applied only where sigma_lo < sigma <= sigma_hi
and the plain conditional model runs elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a
limited interval improves sample and distribution quality in diffusion models"); a call
with no sample inside the interval runs the conditional branch alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sampling.frame import batch_sigma

__all__ = ["classifier_free"]


def classifier_free(
    denoiser,
    scale: float,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor],
    interval: tuple[float, ...] | None = None,
):
    """D~(x, sigma) = D(x, sigma, **uncond) + scale (D(x, sigma, **cond) - D(x, sigma, **uncond)),
    only for sigma in (interval[0], interval[1]] when ``interval`` is given (VE sigma).

    ``cond`` and ``uncond`` hold the same keys with batch-first tensors (e.g. class labels and
    the null label) that are concatenated along the batch for the single network call.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    if interval is not None and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
        raise ValueError(f"guidance interval needs 0 <= sigma_lo < sigma_hi, got {interval}")
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def guided(x: Tensor, sigma) -> Tensor:
        s = batch_sigma(sigma, x)
        if interval is None:
            inside = None
        else:  # per sample: a result never depends on the other samples' noise levels
            inside = (s > interval[0]) & (s <= interval[1])
            if not bool(inside.any()):
                return denoiser(x, s, **cond)
        d_cond, d_uncond = denoiser(torch.cat([x, x]), torch.cat([s, s]), **both).chunk(2)
        out = d_uncond + scale * (d_cond - d_uncond)
        return out if inside is None else torch.where(inside, out, d_cond)

    return guided
