"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models", Sec. 2; k = 3 is their default).

The manifold of a feature set is the union of balls around its points, each with the radius
to that point's k-th nearest neighbour in the set (the point itself not counted; a duplicate
counts, as in the reference implementation). Precision is the fraction of generated features
inside the real manifold; recall the fraction of real features inside the generated one.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 24
"""Distances held at once (128 MiB of float64): rows per block = BLOCK_ELEMENTS // len(support)."""


def _row_blocks(queries: Tensor, support: Tensor):
    """(start, distances of queries[start:start+rows] to every support point) in float64 blocks."""
    rows = max(1, BLOCK_ELEMENTS // support.shape[0])
    for start in range(0, queries.shape[0], rows):
        yield start, torch.cdist(queries[start : start + rows].double(), support.double())


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each feature to its k-th nearest neighbour among the others: (N,)."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k must be in [1, N-1] = [1, {features.shape[0] - 1}], got {k}")
    # k+1-th smallest of a row that includes the point itself at distance 0
    return torch.cat([d.kthvalue(k + 1, dim=1).values for _, d in _row_blocks(features, features)])


def inside(queries: Tensor, support: Tensor, radii: Tensor) -> Tensor:
    """For each query, whether some support point i has |query - support_i| <= radii_i."""
    radii = radii.double().to(support.device)
    return torch.cat([(d <= radii).any(dim=1) for _, d in _row_blocks(queries, support)])


def precision_recall(real: Tensor, generated: Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of ``generated`` (N, d) against ``real`` (M, d) features."""
    precision = inside(generated, real, knn_radii(real, k)).double().mean()
    recall = inside(real, generated, knn_radii(generated, k)).double().mean()
    return float(precision), float(recall)
