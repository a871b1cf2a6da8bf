"""The runtime under real processes (torchrun, gloo on CPU), through ``train_worker.py``:

* two-process DDP == one process with the doubled batch (loss trajectory, gradient norms,
  final weights, EMA);
* DeepSpeed ZeRO-2 and ZeRO-3 on two processes train like that single process, checkpoint
  through ``checkpoint.save(runtime.training_state(...))``, and a job stopped and resumed
  equals an uninterrupted one exactly;
* the EMA moves under ZeRO-2/3 (diffusers' did not under DeepSpeed: their issue #5783) and
  equals the single-process EMA.

DeepSpeed tests skip when deepspeed is not installed, unless LATENTPIPE_REQUIRE_DEEPSPEED=1
(CI). The first DeepSpeed run on a machine JIT-builds its shm comm op (~1 minute, cached in
~/.cache/torch_extensions).
"""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import free_port, small_deepspeed_config

WORKER = Path(__file__).with_name("train_worker.py")
REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 6, 4
pytestmark = pytest.mark.slow

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None and not os.environ.get("LATENTPIPE_REQUIRE_DEEPSPEED"),
    reason="deepspeed is not installed: pip install -c tools/constraints.txt -e '.[test]' (or set "
    "LATENTPIPE_REQUIRE_DEEPSPEED=1 to fail instead)",
)


def _train(out: Path, *args, processes: int = 2, batch: int = BATCH) -> dict:
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
        ]
    )
    result = subprocess.run(
        [*launcher, str(WORKER), "--batch", str(batch), "--steps", str(STEPS), "--out", str(out), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=True) if out.exists() else {}


def _assert_same_training(a: dict, b: dict, exact: bool = False) -> None:
    compare = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert compare(torch.tensor(a["losses"]), torch.tensor(b["losses"])), (a["losses"], b["losses"])
    assert compare(torch.tensor(a["norms"]), torch.tensor(b["norms"])), (a["norms"], b["norms"])
    for part in ("final", "ema"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert a[part][name].shape == b[part][name].shape, (part, name)
            assert compare(a[part][name].float(), b[part][name].float()), (part, name)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One process, the doubled batch, gradient clipping on: the reference trajectory."""
    return _train(tmp_path_factory.mktemp("single") / "out.pt", "--grad-clip", 0.5, processes=1, batch=2 * BATCH)


def test_two_process_ddp_equals_one_process_with_doubled_batch(single, tmp_path):
    two = _train(tmp_path / "out.pt", "--grad-clip", 0.5)
    assert two["world_size"] == 2 and single["world_size"] == 1 and two["zero_stage"] == 0
    assert len(two["losses"]) == STEPS and all(math.isfinite(loss) for loss in two["losses"])
    _assert_same_training(two, single)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_resumes_and_keeps_an_ema(single, tmp_path, stage):
    config = small_deepspeed_config(tmp_path, stage)
    straight = _train(tmp_path / "straight.pt", "--deepspeed", config, "--grad-clip", 0.5)
    assert straight["zero_stage"] == stage and straight["world_size"] == 2
    _assert_same_training(straight, single)  # ZeRO's partitioned AdamW + clipping == plain AdamW
    moved = max((straight["ema"][n] - straight["initial"][n].float()).abs().max() for n in straight["ema"])
    assert moved > 1e-2  # the EMA followed the training (diffusers #5783: it silently did not)

    checkpoints = tmp_path / "checkpoints"
    common = ("--deepspeed", config, "--grad-clip", 0.5, "--checkpoint-every", 2, "--checkpoints", checkpoints)
    _train(tmp_path / "first.pt", *common, "--stop-at", 3)  # a job stopped after step 3 (checkpoint at 2)
    step_dir = checkpoints / "step-00000002"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "complete.json",
        "elastic.pt",  # what another number of ranks resumes from (tests/faults/test_elastic.py)
        "rank-00000.pt",
        "rank-00001.pt",
        "state.pt",
    ]
    own = torch.load(step_dir / "rank-00001.pt", weights_only=True)
    assert own["zero"]["counters"]["global_steps"] == 2
    elastic = torch.load(step_dir / "elastic.pt", weights_only=True)["zero_full"]
    resumed = _train(tmp_path / "resumed.pt", *common, "--dump-resumed", tmp_path / "gathered.pt")
    _assert_same_training(resumed, straight, exact=True)
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)["zero_full"]  # before a step
    assert gathered["step"] == elastic["step"] == 2.0
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(gathered[key][name], value) for name, value in elastic[key].items()), key


@pytest.mark.parametrize("stage", [0, pytest.param(2, marks=needs_deepspeed)])
def test_gradient_accumulation_equals_the_whole_batch(single, tmp_path, stage):
    config = ("--deepspeed", small_deepspeed_config(tmp_path, stage)) if stage else ()
    accumulated = _train(tmp_path / "out.pt", *config, "--grad-clip", 0.5, "--accumulate", 2)
    _assert_same_training(accumulated, single)


@needs_deepspeed
@pytest.mark.parametrize("processes", [1, 2])
def test_runtimes_of_both_kinds_one_after_another(tmp_path, processes):
    """One `latentpipe run` process makes a Runtime per stage: DDP, DeepSpeed, DDP again."""
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
        ]
    )
    result = subprocess.run(
        [*launcher, str(WORKER.with_name("sequence_worker.py")), str(small_deepspeed_config(tmp_path, 2))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("ok") == processes * 3, result.stdout
