"""The autoencoder stage under two real processes (torchrun, gloo): it completes, every rank
checkpoints its loader, and a resumed 2-rank run equals an uninterrupted one."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline import artifacts, config, manifest
from stages import prepare
from tests.support import free_port

ARGS = [
    "data.source=digits",
    "data.limit=400",
    "data.resolution=16",
    "data.shard_max_count=60",
    "data.workers=0",
    "autoencoder.channels=8",
    "autoencoder.num_codes=32",
    "autoencoder.batch_size=6",
    "autoencoder.num_workers=0",
    "autoencoder.checkpoint_every=4",
    "autoencoder.dead_code_steps=2",
    "autoencoder.lpips=none",
]


def _torchrun(root, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "pipeline.cli",
            "-q",
            "autoencoder",
            f"experiment.runs_dir={root}",
            *ARGS,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    prepare.run(config.load(overrides=[f"experiment.runs_dir={root}", *ARGS]))
    return root / "tiny" / "prepare"


def _copy(prepared, root):
    shutil.copytree(prepared, root / "tiny" / "prepare")
    return root


def test_two_ranks_resumed_equals_uninterrupted(prepared, tmp_path):
    straight = _copy(prepared, tmp_path / "straight")
    _torchrun(straight, "autoencoder.max_steps=8")
    found = manifest.read(straight / "tiny" / "autoencoder")
    assert found["status"] == "complete" and found["metrics"]["steps"] == 8
    last = straight / "tiny" / "autoencoder" / "checkpoints" / "step-00000008"
    assert sorted(p.name for p in last.iterdir()) == ["complete.json", "rank-00000.pt", "rank-00001.pt", "state.pt"]

    resumed = _copy(prepared, tmp_path / "resumed")
    _torchrun(resumed, "autoencoder.max_steps=4")
    _torchrun(resumed, "autoencoder.max_steps=8")  # continues from step 4's checkpoint
    a = load_file(straight / "tiny" / "autoencoder" / artifacts.TrainedAutoencoder.WEIGHTS_FILE)
    b = load_file(resumed / "tiny" / "autoencoder" / artifacts.TrainedAutoencoder.WEIGHTS_FILE)
    for name in a:
        assert torch.equal(a[name], b[name]), name
