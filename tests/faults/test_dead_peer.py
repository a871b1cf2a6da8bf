"""A dead or hung peer under torchrun (gloo): the surviving rank does not hang. kill -9 of one rank
mid-training ends the job at once with torchrun naming the dead rank; a rank stopped with SIGSTOP
(a lost node: its sockets stay open) ends it after ``LATENTPIPE_COLLECTIVE_TIMEOUT_S``. The rerun
resumes from the last checkpoint and completes."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import config, manifest
from pipeline.runtime.dist import COLLECTIVE_TIMEOUT_ENV
from stages import prepare
from tests.support import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ARGS = [
    "data.source=digits",
    "data.limit=200",
    "data.resolution=16",
    "data.shard_max_count=40",
    "data.workers=0",
    "autoencoder.channels=8",
    "autoencoder.num_codes=32",
    "autoencoder.batch_size=4",
    "autoencoder.num_workers=0",
    "autoencoder.checkpoint_every=2",
    "autoencoder.image_every=1000",
    "autoencoder.lpips=none",
    "autoencoder.max_steps=400",
]
TIMEOUT_S = 10


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    prepare.run(config.load(overrides=[f"experiment.runs_dir={root}", *ARGS]))
    return root / "tiny" / "prepare"


def _torchrun(root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "pipeline.cli",
        "autoencoder",
        f"experiment.runs_dir={root}",
        *ARGS,
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), COLLECTIVE_TIMEOUT_ENV: str(TIMEOUT_S)}


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with ``RANK=rank``."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"torchrun {launcher} has no rank {rank}")


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_peer_ends_the_job_and_the_rerun_resumes(prepared, tmp_path, how):
    shutil.copytree(prepared, tmp_path / "tiny" / "prepare")
    checkpoints = tmp_path / "tiny" / "autoencoder" / "checkpoints"
    job = subprocess.Popen(
        _torchrun(tmp_path),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoints.glob("step-*")):
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint in 240 s"
            time.sleep(0.05)
        victim = _rank_pid(job.pid, 1)
        os.kill(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        hit = time.monotonic()
        output, _ = job.communicate(timeout=TIMEOUT_S + 90)
        elapsed = time.monotonic() - hit
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0, output
    if how == "kill":
        # torchrun sees the worker die and names it in its failure summary
        assert elapsed < 60, (elapsed, output[-3000:])
        assert "rank      : 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    else:
        # the survivor's collective times out; torchrun names it and the hung rank is not waited for
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 60, (elapsed, output[-3000:])
        assert "rank      : 0" in output, output[-3000:]
    assert manifest.read(tmp_path / "tiny" / "autoencoder")["status"] != "complete"
    saved = sorted(checkpoints.glob("step-*"))[-1]
    step = int(saved.name.removeprefix("step-"))

    rerun = subprocess.run(
        _torchrun(tmp_path, f"autoencoder.max_steps={step + 2}"),
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {saved} (step {step})" in rerun.stderr, rerun.stderr[-3000:]
    found = manifest.read(tmp_path / "tiny" / "autoencoder")
    assert found["status"] == "complete" and found["metrics"]["steps"] == step + 2
