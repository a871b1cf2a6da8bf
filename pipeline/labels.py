"""The class label each sample index is generated for.

Labels are a function of the sample index (and the seed), never of the batch or the rank
that renders it, so a sample set is the same however it is split (stages/sample.py) and two
samplers compared on the same indices see the same labels (tools/bench_quality.py).
"""

from __future__ import annotations

import torch

from pipeline import config
from pipeline.seeding import generator


def labels_for(cfg: config.SampleConfig, indices: range, num_classes: int, seed: int) -> torch.Tensor | None:
    """The class label of each sample index (None for an unconditional model): every class in
    turn (``all``: i mod C), the given list in turn (``given``), or one random draw per index."""
    if not num_classes:
        return None
    if cfg.labels == "all":
        return torch.tensor([i % num_classes for i in indices])
    if cfg.labels == "given":
        if max(cfg.given_labels) >= num_classes or min(cfg.given_labels) < 0:
            raise config.ConfigError(f"sample.given_labels: {cfg.given_labels} are not all in [0, {num_classes})")
        return torch.tensor([cfg.given_labels[i % len(cfg.given_labels)] for i in indices])
    return torch.stack([torch.randint(num_classes, (), generator=generator(seed, "label", i)) for i in indices])
