"""Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium", Sec. "Performance Measure"): the Frechet distance
between Gaussians fitted to two sets of features (Dowson & Landau 1982),

    d^2((m1, C1), (m2, C2)) = |m1 - m2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)).

Tr (C1 C2)^(1/2) is taken in the symmetric eigen form: C1 C2 is similar to the symmetric PSD
matrix S = C1^(1/2) C2 C1^(1/2) (by continuity also for singular C1), so its eigenvalues are
those of S, real and >= 0, and the trace is the sum of their square roots. This needs no
``scipy.linalg.sqrtm`` of a non-symmetric product, hence no imaginary parts to discard and no
eps offset for singular covariances (fewer images than feature dimensions); tests check it
against the pytorch-fid/TTUR form (sqrtm, real part) where that one is well conditioned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FeatureStats:
    """Mean, covariance and count of a set of features: all FID needs of one side."""

    mean: np.ndarray
    """(d,) float64."""
    cov: np.ndarray
    """(d, d) float64, unbiased (divides by count - 1), as the reference implementations."""
    count: int
    """Number of feature vectors the statistics were computed from."""

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Statistics of (N, d) features, N >= 2, accumulated in float64."""
        f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need (N, d) features with N >= 2, got shape {f.shape}")
        return cls(mean=f.mean(0), cov=np.cov(f, rowvar=False), count=f.shape[0])


def _numerical_zeros_dropped(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those at rounding level set to 0: below
    max|w| * n * eps, numpy.linalg.matrix_rank's default tolerance. Their square roots
    (~1e-8 each) would otherwise add up over the thousands of null directions that a
    covariance of fewer images than feature dimensions has."""
    return np.where(w > np.abs(w).max() * len(w) * np.finfo(w.dtype).eps, w, 0.0)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(_numerical_zeros_dropped(w))) @ v.T


def trace_sqrt_product(c1: np.ndarray, c2: np.ndarray) -> float:
    """Tr (C1 C2)^(1/2) for symmetric PSD C1, C2, as the sum of sqrt eigenvalues of C1^½ C2 C1^½."""
    r = _psd_sqrt(c1)
    s = r @ c2 @ r
    return float(np.sqrt(_numerical_zeros_dropped(np.linalg.eigvalsh((s + s.T) / 2))).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Squared Frechet distance of the Gaussians N(a.mean, a.cov), N(b.mean, b.cov): the FID when
    both come from :class:`pipeline.metrics.features.InceptionFeatures`."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature widths differ: {a.mean.shape} vs {b.mean.shape}")
    diff = a.mean - b.mean
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * trace_sqrt_product(a.cov, b.cov))
