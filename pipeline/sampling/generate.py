"""Generate a batch of (optionally class-conditional, guided) samples with one generator per
sample, so that every sample depends only on its own seed, not on the batch it is rendered in
or the number of ranks rendering the set.

``generate`` is ``sample(conditioned(...), initial_noise(...) * sigmas[0], ...)``; the two
pieces are public so that other samplers (tools/bench_quality.py runs k-diffusion's and
diffusers') can start from the same noises on the same guided denoiser.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline import seeding
from pipeline.sampling import sample
from pipeline.sampling.guidance import classifier_free

__all__ = ["conditioned", "generate", "initial_noise"]


def initial_noise(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str = "cpu"
) -> Tensor:
    """Standard normal draws (len(generators), *shape), row i from generators[i]."""
    return torch.stack([seeding.randn(shape, g, device=device) for g in generators])


def conditioned(
    denoiser,
    labels: Tensor | None = None,
    null_class: int | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, ...] | None = None,
):
    """``denoiser`` with ``labels`` bound: plain conditional at guidance_scale w = 1, else
    classifier-free guidance against the ``null_class`` label (Ho & Salimans 2022), only inside
    ``guidance_interval`` = (sigma_lo, sigma_hi) when given. One call evaluates both branches in
    one batched network call."""
    if labels is None:
        return denoiser
    if guidance_scale == 1.0:
        return functools.partial(denoiser, y=labels)
    if null_class is None:
        raise ValueError("guidance needs the null_class label of the unconditional branch")
    return classifier_free(
        denoiser, guidance_scale, {"y": labels}, {"y": torch.full_like(labels, null_class)}, guidance_interval
    )


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
    ``options`` go to the solver (e.g. eta=, info=).
    """
    noise = initial_noise(shape, generators, device) * sigmas[0].to(device)
    guided = conditioned(denoiser, labels, null_class, guidance_scale, guidance_interval)
    return sample(guided, noise, sigmas.to(device), method=method, generator=list(generators), **options)
