"""Metrics to a JSONL file and TensorBoard, images to PNG, from the main rank only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torchvision.utils

from pipeline import atomic


class MetricsLog:
    def __init__(self, directory: Path, *, enabled: bool, tensorboard: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        self._writer = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.directory / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.directory / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)

    def images(self, step: int, name: str, batch: torch.Tensor, nrow: int) -> Path | None:
        """Save a grid of images in [-1, 1] as ``images/<name>-<step>.png``."""
        if not self.enabled:
            return None
        grid = torchvision.utils.make_grid(batch.detach().float().cpu().clamp(-1, 1), nrow=nrow,
                                           normalize=True, value_range=(-1, 1))
        path = self.directory / "images" / f"{name}-{step:08d}.png"
        with atomic.atomic_open(path) as handle:
            torchvision.utils.save_image(grid, handle, format="png")
        if self._writer is not None:
            self._writer.add_image(name, grid, step)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
