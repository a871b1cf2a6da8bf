"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4 "Evaluation
metrics"): the squared MMD between two feature sets under the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3,    d the feature width,

estimated without bias (the U-statistic MMD^2_u of Gretton et al. 2012, "A Kernel Two-Sample
Test"), and averaged over random subsets as the reference implementations do (Binkowski et al.'s
``compute_scores.polynomial_mmd_averages``: 100 subsets of 1000; stylegan3's
``kernel_inception_distance``): each subset draws min(subset_size, N_x, N_y) rows of each set
without replacement. Unbiased means its expectation is 0 for two samples of one distribution,
so a single estimate can be negative.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline import seeding


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x_i, y_j) = (x_i . y_j / d + 1)^3 for all pairs: (N, d), (M, d) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1))
    - 2 sum_{i,j} k(x_i, y_j) / (m n), in float64 (m, n >= 2)."""
    x, y = x.double(), y.double()
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    return (
        (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        - 2 * polynomial_kernel(x, y).sum() / (m * n)
    )


def kernel_inception_distance(
    x: Tensor, y: Tensor, *, generator: torch.Generator, subsets: int = 100, subset_size: int = 1000
) -> tuple[float, float]:
    """(mean, standard deviation) of :func:`mmd2_unbiased` over ``subsets`` random subset pairs
    (the standard deviation of the subset values, numpy's ddof=0, as both references report).

    ``generator`` (on any device) draws the subsets, on its own device; with ``subset_size`` at least both set sizes
    every subset is the whole set and the result does not depend on it.
    """
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {x.shape[0]} and {y.shape[0]}")
    values = torch.stack(
        [
            mmd2_unbiased(
                x[seeding.randperm(x.shape[0], generator, device=x.device)[:size]],
                y[seeding.randperm(y.shape[0], generator, device=y.device)[:size]],
            )
            for _ in range(subsets)
        ]
    )
    return float(values.mean()), float(values.std(correction=0))
