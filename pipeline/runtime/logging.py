"""Metrics to a JSONL file, TensorBoard and optionally Weights & Biases; images to PNG; from the
main rank only."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torchvision.utils

from pipeline import atomic


class MetricsLog:
    """``start_step``: the step training (re)starts from. Records of later steps, left by a run
    that went on past its last checkpoint (or by an earlier run, when starting afresh at 0), are
    dropped, so the log tells the history of the weights that exist."""

    def __init__(
        self,
        directory: Path,
        *,
        enabled: bool,
        start_step: int = 0,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict | None = None,
    ):
        self.directory = Path(directory)
        self.enabled = enabled
        self._writer = self._wandb = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            log = self.directory / "metrics.jsonl"
            if log.is_file():
                kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= start_step]
                atomic.write_text(log, "".join(line + "\n" for line in kept))
            for image in self.directory.glob("images/*-*.png"):
                if int(image.stem.rsplit("-", 1)[1]) > start_step:
                    image.unlink()
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.directory / "tensorboard"), purge_step=start_step + 1)
            if wandb_project:
                self._wandb = _wandb_run(self.directory, wandb_project, config or {})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.directory / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def images(self, step: int, name: str, batch: torch.Tensor, nrow: int) -> Path | None:
        """Save a grid of images in [-1, 1] as ``images/<name>-<step>.png``."""
        if not self.enabled:
            return None
        grid = torchvision.utils.make_grid(
            batch.detach().float().cpu().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1)
        )
        path = self.directory / "images" / f"{name}-{step:08d}.png"
        with atomic.atomic_open(path) as handle:
            torchvision.utils.save_image(grid, handle, format="png")
        if self._writer is not None:
            self._writer.add_image(name, grid, step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(str(path))}, step=step)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(directory: Path, project: str, config: dict):
    """A W&B run named after the stage directory; its id is derived from the directory, so a
    resumed job continues the same run. WANDB_MODE=offline works without a network."""
    try:
        import wandb
    except ImportError:
        from pipeline.errors import LatentpipeError

        raise LatentpipeError(
            "experiment.wandb_project is set but wandb is not installed: "
            "pip install 'latentpipe[wandb]', or unset experiment.wandb_project"
        ) from None
    run_id = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return wandb.init(
        project=project,
        name=f"{directory.parent.name}/{directory.name}",
        id=run_id,
        resume="allow",
        config=config,
        dir=str(directory),
    )
