"""Signals to the whole process group of a real `latentpipe autoencoder` / `latentpipe diffusion`
process with DataLoader workers (what SLURM's preemption, time limit and scancel, `timeout`,
`kill -- -PGID` and Ctrl-C do): the trainer checkpoints and exits 75 (SIGTERM) or 130 (SIGINT)
with the manifest `interrupted`, and rerunning it ends with the weights of an uninterrupted run."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import artifacts, config, manifest
from pipeline.errors import REQUEUE_EXIT_CODE
from pipeline.runtime.preemption import INTERRUPT_EXIT_CODE
from stages import autoencoder, diffusion, encode, prepare

pytestmark = pytest.mark.slow

ARGS = [
    "data.source=digits",
    "data.limit=200",
    "data.resolution=16",
    "data.shard_max_count=40",
    "data.workers=0",
    "autoencoder.channels=8",
    "autoencoder.num_codes=32",
    "autoencoder.batch_size=8",
    "autoencoder.num_workers=1",
    "autoencoder.max_steps=30",
    "autoencoder.lpips=none",
    "autoencoder.checkpoint_every=2",
    "autoencoder.image_every=1000",
    "autoencoder.shuffle_buffer=50",
    "encode.batch_size=16",
    "diffusion.backbone=dit",
    "diffusion.dit.width=32",
    "diffusion.dit.depth=2",
    "diffusion.dit.num_heads=2",
    "diffusion.dit.patch_size=1",
    "diffusion.batch_size=8",
    "diffusion.max_steps=40",
    "diffusion.num_workers=1",
    "diffusion.warmup_steps=2",
    "diffusion.checkpoint_every=2",
    "diffusion.image_every=1000",
    "diffusion.shuffle_buffer=50",
]
UPSTREAM = {"autoencoder": ("prepare",), "diffusion": ("prepare", "autoencoder", "encode")}
WEIGHTS = {
    "autoencoder": artifacts.TrainedAutoencoder.WEIGHTS_FILE,
    "diffusion": artifacts.TrainedDenoiser.WEIGHTS_FILE,
}


def _cfg(root: Path) -> config.Config:
    return config.load(overrides=[f"experiment.runs_dir={root}", *ARGS])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A run with every stage the two training stages read, and each stage's uninterrupted weights."""
    root = tmp_path_factory.mktemp("runs")
    cfg = _cfg(root)
    # bitwise comparison with the subprocesses (_env): this module fixture is set up before the
    # autouse fixture that sets the thread count, so set it here as well
    torch.set_num_threads(1)
    prepare.run(cfg)
    weights = {"autoencoder": load_file(autoencoder.run(cfg) / WEIGHTS["autoencoder"])}
    encode.run(cfg)
    weights["diffusion"] = load_file(diffusion.run(cfg) / WEIGHTS["diffusion"])
    return root, weights


def _copy(root: Path, stage: str, target: Path) -> config.Config:
    for name in UPSTREAM[stage]:
        shutil.copytree(root / "tiny" / name, target / "tiny" / name)
    return _cfg(target)


def _env() -> dict[str, str]:
    """One thread, as the in-process reference run: weights are compared bit for bit."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))


def _command(stage: str, target: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "-q", stage, f"experiment.runs_dir={target}", *ARGS]


def _signal_group_after_first_checkpoint(stage: str, target: Path, cfg: config.Config, sig: int) -> tuple[int, str]:
    """Start the stage in its own session (process group = the trainer and its workers), send
    ``sig`` to the whole group once its first checkpoint exists; (exit code, stderr)."""
    checkpoints = cfg.stage_dir(stage) / "checkpoints"
    process = subprocess.Popen(
        _command(stage, target),
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoints.glob("step-*")):
            assert process.poll() is None, f"{stage} ended before its first checkpoint: {process.stderr.read()}"
            assert time.monotonic() < deadline, f"{stage} wrote no checkpoint in 240 s"
            time.sleep(0.05)
        workers = _children(process.pid)
        assert workers, "the stage runs no DataLoader worker: the test would not test them"
        os.killpg(process.pid, sig)
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, stderr


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in found.read_text().split()] if found.exists() else []


@pytest.mark.parametrize(
    "stage, sig, code",
    [
        ("autoencoder", signal.SIGTERM, REQUEUE_EXIT_CODE),
        ("diffusion", signal.SIGTERM, REQUEUE_EXIT_CODE),
        ("autoencoder", signal.SIGINT, INTERRUPT_EXIT_CODE),
        ("diffusion", signal.SIGINT, INTERRUPT_EXIT_CODE),
    ],
)
def test_a_signal_to_the_process_group_checkpoints_and_the_rerun_ends_like_an_uninterrupted_run(
    upstream, tmp_path, stage, sig, code
):
    root, expected = upstream
    cfg = _copy(root, stage, tmp_path)
    rc, stderr = _signal_group_after_first_checkpoint(stage, tmp_path, cfg, sig)
    assert rc == code, stderr
    assert "killed by signal" not in stderr and "Traceback" not in stderr, stderr
    found = manifest.read(cfg.stage_dir(stage))
    assert found["status"] == "interrupted" and signal.Signals(sig).name in found["error"], found
    stopped_at = int(found["error"].split(" stopped at step ")[1].split()[0])
    assert 0 < stopped_at < getattr(cfg, stage).max_steps
    assert (cfg.stage_dir(stage) / "checkpoints" / f"step-{stopped_at:08d}").is_dir()

    rerun = subprocess.run(
        _command(stage, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert rerun.returncode == 0, rerun.stderr
    assert manifest.read(cfg.stage_dir(stage))["status"] == "complete"
    resumed = load_file(cfg.stage_dir(stage) / WEIGHTS[stage])
    assert resumed.keys() == expected[stage].keys()
    for name, value in expected[stage].items():
        assert torch.equal(resumed[name], value), name
