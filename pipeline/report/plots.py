"""The report's figures as PNG files, drawn with matplotlib's non-interactive Agg backend (no
display needed on a cluster node). Each function takes plain numbers or arrays, so the report
can be rebuilt from what the stages wrote without loading a model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # before pyplot: a job without a display must not try to open one
import matplotlib.pyplot as plt

from pipeline import atomic

DPI = 100


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic.atomic_open(path) as handle:
        figure.savefig(handle, format="png", dpi=DPI, metadata={"Software": None})  # no version: same input, same bytes
    plt.close(figure)
    return path


def training_curves(
    records: Sequence[Mapping[str, float]], keys: Sequence[tuple[str, str]], title: str, path: Path
) -> Path | None:
    """One panel per ``(key, label)`` present in the records (metrics.jsonl lines: ``step`` plus
    values), against the step; None when no key is present. Loss-like panels use a log axis
    when their values span more than a factor 20 and are positive."""
    present = [(key, label) for key, label in keys if any(key in r for r in records)]
    if not present:
        return None
    columns = min(3, len(present))
    rows = math.ceil(len(present) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (key, label) in zip(axes.flat, present):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
        steps, values = zip(*points) if points else ((), ())
        axis.plot(steps, values, marker="." if len(points) < 30 else None)
        if values and min(values) > 0 and max(values) > 20 * min(values):
            axis.set_yscale("log")
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(present) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    return _save(figure, path)


def image_grid(images: np.ndarray, captions: Sequence[str] | None, columns: int, title: str, path: Path) -> Path:
    """uint8 images (N, H, W, C) in a grid, each with its caption (e.g. the class it was
    generated for) above it."""
    count = len(images)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.25 * rows + 0.4), squeeze=False)
    for i, axis in enumerate(axes.flat):
        axis.axis("off")
        if i >= count:
            continue
        image = images[i]
        axis.imshow(
            image[..., 0] if image.shape[-1] == 1 else image,
            cmap="gray" if image.shape[-1] == 1 else None,
            vmin=0,
            vmax=255,
            interpolation="nearest",
        )
        if captions is not None:
            axis.set_title(captions[i], fontsize=7, pad=2)
    figure.suptitle(title)
    return _save(figure, path)


def labelled_rows(grid: np.ndarray, labels: Sequence[str], title: str, path: Path) -> Path:
    """A saved grid image (H, W, C uint8) whose rows are ``labels`` (e.g. input, reconstruction)."""
    height = grid.shape[0]
    figure, axis = plt.subplots(
        figsize=(min(12.0, 1.2 * grid.shape[1] / height * len(labels) + 1.5), 0.9 * len(labels) + 0.6)
    )
    axis.imshow(
        grid[..., 0] if grid.shape[-1] == 1 else grid,
        cmap="gray" if grid.shape[-1] == 1 else None,
        interpolation="nearest",
    )
    axis.set_yticks([(i + 0.5) * height / len(labels) for i in range(len(labels))], labels)
    axis.set_xticks([])
    axis.set_title(title)
    return _save(figure, path)


def per_class_accuracy(
    per_class: Mapping[str, float], names: Sequence[str], reference: float | None, path: Path
) -> Path:
    """Bars of the classifier's accuracy on the samples of each class; a dashed line at its
    accuracy on real val images (what a perfect generator would score) and at chance."""
    figure, axis = plt.subplots(figsize=(max(5.5, 0.45 * len(per_class) + 1.5), 3.4))
    axis.bar(range(len(per_class)), list(per_class.values()), color="tab:blue")
    slanted = max(map(len, names), default=0) * len(names) > 40  # long names would overlap
    axis.set_xticks(
        range(len(per_class)), names, rotation=45 if slanted else 0, ha="right" if slanted else "center", fontsize=8
    )
    if reference is not None:
        axis.axhline(reference, color="tab:green", linestyle="--", label=f"on real val images ({reference:.1%})")
    axis.axhline(1 / len(per_class), color="gray", linestyle=":", label="chance")
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.set_title("classifier accuracy on the samples, per class", fontsize=10)
    axis.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def against_floor(bars: Mapping[str, tuple[str, float, float | None]], path: Path) -> Path:
    """One panel per ``{metric: (what, value, floor)}``: e.g. FID of the samples next to the FID
    of as many real train images (the floor); a floor of None is left out."""
    figure, axes = plt.subplots(1, len(bars), figsize=(3.2 * len(bars), 3.2), squeeze=False)
    for axis, (name, (what, value, floor)) in zip(axes.flat, bars.items()):
        labels, values, colours = [what], [value], ["tab:blue"]
        if floor is not None:
            labels, values, colours = [*labels, "real (floor)"], [*values, floor], [*colours, "tab:green"]
        axis.bar(labels, values, color=colours)
        for x, v in enumerate(values):
            axis.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=9)
        axis.set_title(name)
        axis.margins(y=0.15)
    return _save(figure, path)
