"""In-process checks of the Runtime's guard rails (the multi-process behaviour is in test_processes)."""

import json

import pytest
import torch

from pipeline.runtime.dist import Runtime
from pipeline.runtime.optim import build_optimizer, lr_schedule


def test_prepare_refuses_a_scheduler():
    runtime = Runtime()
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model.parameters(), lr=0.1, betas=(0.9, 0.9), weight_decay=0.0)
    scheduler = lr_schedule(optimizer, warmup_steps=0, total_steps=3, kind="constant")
    with pytest.raises(TypeError, match="scheduler.step"):
        runtime.prepare(model, optimizer, scheduler)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "remove the optimizer"),
        ({"zero_optimization": {"stage": 0}}, "must be 1, 2 or 3"),
    ],
)
def test_deepspeed_config_errors_name_the_fix(tmp_path, config, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        Runtime(deepspeed=path)
    with pytest.raises(FileNotFoundError, match="configs/deepspeed"):
        Runtime(deepspeed=tmp_path / "absent.json")
