"""The metrics log tells the history of the weights that exist: records past the step a run
restarts from (a resume, or a fresh start at 0) are dropped."""

import json

import pytest
import torch

from pipeline.runtime.logging import MetricsLog


def _log(directory, start_step, steps):
    log = MetricsLog(directory, enabled=True, start_step=start_step, tensorboard=False)
    for step in steps:
        log.scalars(step, {"loss": float(step)})
        log.images(step, "samples", torch.zeros(1, 1, 4, 4), nrow=1)
    log.close()


def test_resume_drops_records_past_the_checkpoint_and_a_fresh_start_drops_all(tmp_path):
    _log(tmp_path, 0, [1, 2, 3, 4])
    _log(tmp_path, 2, [3, 4, 5])  # resumed from the step-2 checkpoint
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    _log(tmp_path, 0, [1])  # started afresh
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["samples-00000001.png"]


def test_other_ranks_write_nothing(tmp_path):
    MetricsLog(tmp_path / "run", enabled=False).scalars(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_weights_and_biases_offline_gets_the_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(
        tmp_path / "diffusion",
        enabled=True,
        tensorboard=False,
        wandb_project="latentpipe-test",
        config={"diffusion": {"batch_size": 8}},
    )
    log.scalars(1, {"loss": 0.5})
    log.images(1, "samples", torch.zeros(1, 1, 4, 4), nrow=1)
    log.close()
    assert wandb.run is None
    (run,) = (tmp_path / "diffusion" / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb")) and list(run.rglob("media/images/samples_*.png"))
