"""Generate a batch of (optionally class-conditional, guided) samples with one generator per
sample, so that every sample depends only on its own seed, not on the batch it is rendered in
or the number of ranks rendering the set."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline import seeding
from pipeline.sampling import sample
from pipeline.sampling.guidance import classifier_free


@torch.no_grad()
def generate(
    denoiser,
    shape: Sequence[int],
    sigmas: Tensor,
    generators: Sequence[torch.Generator],
    *,
    method: str,
    labels: Tensor | None = None,
    null_class: int | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, ...] | None = None,
    device: torch.device | str = "cpu",
    **options,
) -> Tensor:
    """``len(generators)`` samples of ``shape`` from ``denoiser`` (called as D(x, sigma, y=...)).

    With ``labels``, guidance_scale w != 1 applies classifier-free guidance against the
    ``null_class`` label (Ho & Salimans 2022); w = 1 is the plain conditional model.
    ``guidance_interval`` = (sigma_lo, sigma_hi) limits guidance to that range of noise levels.
    ``options`` go to the solver (e.g. eta=).
    """
    noise = torch.stack([seeding.randn(shape, g, device=device) for g in generators]) * sigmas[0].to(device)
    if labels is None:
        conditioned = denoiser
    elif guidance_scale == 1.0:
        conditioned = functools.partial(denoiser, y=labels)
    else:
        if null_class is None:
            raise ValueError("guidance needs the null_class label of the unconditional branch")
        conditioned = classifier_free(
            denoiser, guidance_scale, {"y": labels}, {"y": torch.full_like(labels, null_class)}, guidance_interval
        )
    return sample(conditioned, noise, sigmas.to(device), method=method, generator=list(generators), **options)
