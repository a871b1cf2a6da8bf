"""Elastic resume under real processes (torchrun, gloo): a checkpoint written by N ranks resumes
on M ranks. The toy job of tests/runtime keeps the global batch fixed, so a DDP or DeepSpeed
ZeRO-2/3 run stopped on N ranks and continued on M follows the single-process trajectory (DDP's
optimiser state carries over whole; ZeRO's is resharded from the checkpoint's ``elastic.pt``);
the autoencoder stage continues from a checkpoint of another world size.

DeepSpeed tests skip when deepspeed is not installed, unless LATENTPIPE_REQUIRE_DEEPSPEED=1."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import config, manifest
from stages import prepare
from tests.support import free_port, small_deepspeed_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "runtime" / "train_worker.py"
STEPS, GLOBAL_BATCH = 6, 12  # 12 rows: 1, 2 or 3 ranks
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None and not os.environ.get("LATENTPIPE_REQUIRE_DEEPSPEED"),
    reason="deepspeed is not installed (set LATENTPIPE_REQUIRE_DEEPSPEED=1 to fail instead)",
)


def _launch(processes: int, *args) -> list[str]:
    if processes == 1:
        return [sys.executable, *map(str, args)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        *map(str, args),
    ]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _toy(out: Path, processes: int, *args) -> dict:
    _run(
        _launch(
            processes,
            WORKER,
            "--batch",
            GLOBAL_BATCH // processes,
            "--steps",
            STEPS,
            "--out",
            out,
            "--grad-clip",
            0.5,
            *args,
        )
    )
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return _toy(tmp_path_factory.mktemp("single") / "out.pt", 1)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_ddp_stopped_on_n_ranks_continues_on_m_like_one_uninterrupted_run(single, tmp_path, before, after):
    checkpoints = tmp_path / "checkpoints"
    _toy(tmp_path / "first.pt", before, "--checkpoints", checkpoints, "--checkpoint-every", 3, "--stop-at", 3)
    resumed = _toy(tmp_path / "out.pt", after, "--checkpoints", checkpoints)
    assert resumed["world_size"] == after
    assert torch.allclose(torch.tensor(resumed["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    for name, value in single["final"].items():
        assert torch.allclose(resumed["final"][name], value, rtol=1e-5, atol=1e-6), name


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_zero_stopped_on_n_ranks_continues_on_m_with_its_optimizer_state(single, tmp_path, stage, before, after):
    """The fp32 master weights, both Adam moments and the step arrive whole on the new ranks, and
    the rest of the run follows the single-process trajectory (== the uninterrupted N-rank run,
    tests/runtime/test_processes.py), to ZeRO's reduction-order tolerance."""
    checkpoints, config = tmp_path / "checkpoints", small_deepspeed_config(tmp_path, stage)
    common = ("--deepspeed", config, "--checkpoints", checkpoints)
    _toy(tmp_path / "first.pt", before, *common, "--checkpoint-every", 3, "--stop-at", 3)
    written = checkpoints / "step-00000003"
    assert sorted(p.name for p in written.iterdir()) == sorted(
        ["complete.json", "elastic.pt", "state.pt", *(f"rank-{r:05d}.pt" for r in range(before))]
    )
    saved = torch.load(written / "elastic.pt", weights_only=True)["zero_full"]
    resumed = _toy(tmp_path / "out.pt", after, *common, "--dump-resumed", tmp_path / "resumed.pt")
    assert resumed["world_size"] == after and resumed["zero_stage"] == stage

    loaded = torch.load(tmp_path / "resumed.pt", weights_only=True)["zero_full"]  # gathered on M ranks
    assert saved["step"] == loaded["step"] == 3.0 and saved["counters"]["global_steps"] == 3
    assert loaded["counters"] == saved["counters"] and loaded["param_groups"] == saved["param_groups"]
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == loaded[key].keys() == single["final"].keys(), key
        for name, value in saved[key].items():
            assert value.abs().max() > 0, (key, name)  # a real state, not a fresh one
            assert torch.allclose(loaded[key][name], value, rtol=0, atol=1e-6), (key, name)
    assert torch.allclose(torch.tensor(resumed["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.tensor(resumed["norms"]), torch.tensor(single["norms"]), rtol=1e-5, atol=1e-6)
    for part in ("final", "ema"):
        for name, value in single[part].items():
            assert torch.allclose(resumed[part][name], value, rtol=1e-5, atol=1e-6), (part, name)


ARGS = [
    "data.source=digits",
    "data.limit=200",
    "data.resolution=16",
    "data.shard_max_count=24",
    "data.workers=0",
    "autoencoder.channels=8",
    "autoencoder.num_codes=32",
    "autoencoder.batch_size=4",
    "autoencoder.num_workers=1",
    "autoencoder.checkpoint_every=3",
    "autoencoder.image_every=1000",
    "autoencoder.lpips=none",
]


def _stage(root: Path, processes: int, steps: int) -> str:
    command = [
        "-m",
        "pipeline.cli",
        "autoencoder",
        f"experiment.runs_dir={root}",
        *ARGS,
        f"autoencoder.max_steps={steps}",
    ]
    return _run(_launch(processes, *command)).stderr


def test_the_autoencoder_stage_continues_on_another_number_of_ranks(tmp_path):
    prepare.run(config.load(overrides=[f"experiment.runs_dir={tmp_path}", *ARGS]))
    _stage(tmp_path, 2, 3)
    log = _stage(tmp_path, 3, 6)
    stage = tmp_path / "tiny" / "autoencoder"
    assert f"resumed from {stage / 'checkpoints' / 'step-00000003'} (step 3)" in log, log[-3000:]
    assert "written by 2 rank(s); this job has 3" in log, log[-3000:]
    found = manifest.read(stage)
    assert found["status"] == "complete" and found["metrics"]["steps"] == 6
    assert sorted(p.name for p in (stage / "checkpoints" / "step-00000006").iterdir()) == [
        "complete.json",
        "rank-00000.pt",
        "rank-00001.pt",
        "rank-00002.pt",
        "state.pt",
    ]
