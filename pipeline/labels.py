"""The class label each sample index is generated for.

Labels are a function of the sample index (and the seed), never of the batch or the rank
that renders it, so a sample set is the same however it is split (stages/sample.py) and two
samplers compared on the same indices see the same labels (tools/bench_quality.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline import config
from pipeline.seeding import generator

GOLDEN_FRACTION = 0.6180339887498949  # (sqrt(5) - 1) / 2: the most evenly spread Weyl sequence


def labels_for(
    cfg: config.SampleConfig, indices: range, num_classes: int, seed: int, class_counts: Sequence[int] = ()
) -> torch.Tensor | None:
    """The class label of each sample index (None for an unconditional model): every class in
    turn (``all``: i mod C), the given list in turn (``given``), one random draw per index, or
    (``data``) the Weyl sequence u_i = frac((i + 1/2) g) through the inverse CDF of
    ``class_counts`` (the train split's): every prefix of the samples holds each class in close to
    its share, with no randomness."""
    if not num_classes:
        return None
    if cfg.labels == "data":
        if len(class_counts) != num_classes or sum(class_counts) <= 0:
            raise config.ConfigError(
                f"sample.labels=data needs the train split's {num_classes} class counts, got {list(class_counts)}"
            )
        cdf = torch.tensor(class_counts, dtype=torch.float64).cumsum(0)
        u = torch.tensor([(i + 0.5) * GOLDEN_FRACTION % 1 for i in indices], dtype=torch.float64)
        return torch.searchsorted(cdf / cdf[-1], u, right=True).clamp(max=num_classes - 1)
    if cfg.labels == "all":
        return torch.tensor([i % num_classes for i in indices])
    if cfg.labels == "given":
        if max(cfg.given_labels) >= num_classes or min(cfg.given_labels) < 0:
            raise config.ConfigError(f"sample.given_labels: {cfg.given_labels} are not all in [0, {num_classes})")
        return torch.tensor([cfg.given_labels[i % len(cfg.given_labels)] for i in indices])
    return torch.stack([torch.randint(num_classes, (), generator=generator(seed, "label", i)) for i in indices])
