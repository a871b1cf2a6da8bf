"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a denoiser wrapper.

eps~ = eps_u + w (eps_c - eps_u) is affine in eps and D = x - sigma eps, so the same combination
holds for D: D~ = D_u + w (D_c - D_u). w = 1 is the conditional model, w = 0 the unconditional
one (diffusers' ``guidance_scale``; the paper's w is this w - 1). Both branches run in one
batched call: the batch is doubled, conditional half first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sampling.frame import batch_sigma

__all__ = ["classifier_free"]


def classifier_free(denoiser, scale: float, cond: dict[str, Tensor], uncond: dict[str, Tensor]):
    """D~(x, sigma) = D(x, sigma, **uncond) + scale (D(x, sigma, **cond) - D(x, sigma, **uncond)).

    ``cond`` and ``uncond`` hold the same keys with batch-first tensors (e.g. class labels and
    the null label) that are concatenated along the batch for the single network call.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def guided(x: Tensor, sigma) -> Tensor:
        s = batch_sigma(sigma, x)
        d_cond, d_uncond = denoiser(torch.cat([x, x]), torch.cat([s, s]), **both).chunk(2)
        return d_uncond + scale * (d_cond - d_uncond)

    return guided
