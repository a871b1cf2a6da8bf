"""The training toolkit (pipeline.runtime.training) under both training stages: host syncs and
collectives counted per optimiser step, progress lines where the output is a file, the
compiled network trains like the eager one, the TF32 switch."""

import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.diffusion.build import LOSSES, build_network, build_process
from pipeline.runtime import progress, training
from pipeline.runtime.dist import Runtime
from pipeline.runtime.optim import build_optimizer
from pipeline.seeding import generator
from stages import autoencoder, diffusion, encode, prepare

REPO = Path(__file__).resolve().parents[2]
ARGS = [
    "data.source=digits",
    "data.limit=300",
    "data.resolution=16",
    "data.shard_max_count=40",
    "data.workers=0",
    "autoencoder.channels=8",
    "autoencoder.num_codes=32",
    "autoencoder.batch_size=8",
    "autoencoder.num_workers=0",
    "autoencoder.max_steps=5",
    "autoencoder.lpips=none",
    "autoencoder.shuffle_buffer=50",
    "encode.batch_size=16",
    "diffusion.backbone=dit",
    "diffusion.dit.width=32",
    "diffusion.dit.depth=2",
    "diffusion.dit.num_heads=2",
    "diffusion.dit.patch_size=1",
    "diffusion.batch_size=8",
    "diffusion.max_steps=6",
    "diffusion.num_workers=0",
    "diffusion.warmup_steps=2",
    "diffusion.shuffle_buffer=50",
    "diffusion.image_every=1000",
]
# Ways a tensor's value reaches Python, each a device->host sync on CUDA.
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
COLLECTIVES = ("reduce_max_", "any", "all_reduce_sum", "all_gather_rows", "barrier")
# Where the training loop's own checks live: every sync counted must come from here.
LOOP_FILES = {"pipeline/runtime/training.py", "stages/autoencoder.py", "stages/diffusion.py"}


def _cfg(root, *extra):
    return config.load(overrides=[f"experiment.runs_dir={root}", *ARGS, *extra])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = _cfg(root)
    prepare.run(cfg)
    autoencoder.run(cfg)
    encode.run(cfg)
    return root


def _copy(source, root, stages):
    for stage in stages:
        shutil.copytree(source / "tiny" / stage, root / "tiny" / stage)
    return root


class StepCounts:
    """Host syncs (by the file that asked for the value) and Runtime collectives (by name) of
    each optimiser step, counted from the end of one ``TrainingLoop.done`` to the start of the
    next: the step's forward, backward, checks and optimiser update, not its logging or
    checkpointing (which run inside ``done``)."""

    def __init__(self, monkeypatch):
        self.steps: list[tuple[Counter, Counter]] = []
        self._syncs, self._collectives, self._active = Counter(), Counter(), False
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._count_sync(getattr(torch.Tensor, name), name))
        for name in COLLECTIVES:
            monkeypatch.setattr(Runtime, name, self._count_collective(getattr(Runtime, name), name))
        real_done = training.TrainingLoop.done

        def done(loop, *args, **kwargs):
            if self._active:
                self.steps.append((self._syncs, self._collectives))
            self._syncs, self._collectives, self._active = Counter(), Counter(), False
            try:
                return real_done(loop, *args, **kwargs)
            finally:
                self._active = True

        monkeypatch.setattr(training.TrainingLoop, "done", done)

    def _count_sync(self, real, name):
        def counted(tensor, *args, **kwargs):
            if self._active:
                caller = Path(sys._getframe(1).f_code.co_filename).resolve()
                where = str(caller.relative_to(REPO)) if caller.is_relative_to(REPO) else caller.parts[-2]
                self._syncs[f"{where}:{name}"] += 1
            return real(tensor, *args, **kwargs)

        return counted

    def _count_collective(self, real, name):
        def counted(runtime, *args, **kwargs):
            if self._active:
                self._collectives[name] += 1
            return real(runtime, *args, **kwargs)

        return counted


def _assert_one_sync_and_one_check_per_step(counts: StepCounts, steps: int, model_syncs: set[str] = frozenset()):
    assert len(counts.steps) == steps - 1  # steps 2..N (step 1 starts before any done())
    for syncs, collectives in counts.steps:
        loop_syncs = {k: v for k, v in syncs.items() if k.split(":")[0] in LOOP_FILES}
        others = {k: v for k, v in syncs.items() if k.split(":")[0] not in LOOP_FILES | model_syncs}
        assert loop_syncs == {"pipeline/runtime/training.py:tolist": 1}, syncs
        assert others == {}, syncs
        assert collectives["reduce_max_"] == 1 and collectives["any"] == 0, collectives
        assert collectives["barrier"] == 0 and collectives["all_gather_rows"] == 0, collectives


def test_an_autoencoder_step_makes_one_host_sync_and_one_check_collective(encoded, tmp_path, monkeypatch):
    cfg = _cfg(
        _copy(encoded, tmp_path, ["prepare"]),
        "autoencoder.max_steps=6",
        "autoencoder.log_every=3",
        "autoencoder.image_every=100",
        "autoencoder.checkpoint_every=100",
    )
    counts = StepCounts(monkeypatch)
    autoencoder.run(cfg)
    # The VQ codebook's own data-dependent branches (k-means init, dead-code restarts) read
    # values from the device inside the model; they are the model's, not the loop's.
    _assert_one_sync_and_one_check_per_step(counts, 6, model_syncs={"pipeline/autoencoder/codebook.py"})


def test_a_diffusion_step_makes_one_host_sync_and_one_collective(encoded, tmp_path, monkeypatch):
    cfg = _cfg(
        _copy(encoded, tmp_path, ["prepare", "autoencoder", "encode"]),
        "diffusion.log_every=3",
        "diffusion.checkpoint_every=100",
    )
    counts = StepCounts(monkeypatch)
    diffusion.run(cfg)
    _assert_one_sync_and_one_check_per_step(counts, 6)
    assert all(collectives["all_reduce_sum"] == 0 for _, collectives in counts.steps)


def test_the_counter_sees_a_per_step_item(encoded, tmp_path, monkeypatch):
    """The counting above can fail: a loss fetched every step shows up."""
    cfg = _cfg(
        _copy(encoded, tmp_path, ["prepare", "autoencoder", "encode"]),
        "diffusion.max_steps=3",
        "diffusion.log_every=100",
        "diffusion.checkpoint_every=100",
    )
    real = LOSSES["v"]

    def fetched_every_step(*args, **kwargs):
        loss = real(*args, **kwargs)
        loss.item()
        return loss

    monkeypatch.setitem(LOSSES, "v", fetched_every_step)
    counts = StepCounts(monkeypatch)
    diffusion.run(cfg)
    with pytest.raises(AssertionError):
        _assert_one_sync_and_one_check_per_step(counts, 3)


def test_redirected_output_gets_a_progress_line_per_log_window(encoded, tmp_path):
    root = _copy(encoded, tmp_path, ["prepare"])
    output = tmp_path / "job.log"
    with open(output, "w") as handle:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "autoencoder",
                f"experiment.runs_dir={root}",
                *ARGS,
                "autoencoder.max_steps=6",
                "autoencoder.log_every=2",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=300,
            cwd=REPO,
            check=False,
            env={**os.environ, progress.PROGRESS_SECONDS_ENV: "0", "OMP_NUM_THREADS": "1"},
        )
    text = output.read_text()
    assert result.returncode == 0, text[-3000:]
    for step in (2, 4, 6):
        line = next(line for line in text.splitlines() if f"autoencoder: step {step}/6," in line)
        for part in ("loss ", "images/s", "data wait ", "elapsed 0:", "ETA 0:"):
            assert part in line, line


def test_progress_lines_wait_for_the_interval_but_the_last_step_is_always_shown(caplog):
    caplog.set_level(logging.INFO, logger=progress.__name__)
    display = progress.ProgressDisplay("stage", total=8, initial=0, enabled=True)
    assert display.bar is None  # pytest captures the output: not a terminal
    values = {"loss": 0.5, "images_per_s": 10.0, "data_wait_fraction": 0.25}
    for step in (2, 4, 6, 8):
        display.log_step(step, values)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [lines[-1]] and lines[0].startswith("stage: step 8/8, loss 0.5, 10.0 images/s, data wait 25%")


def test_tf32_is_switched_on_cuda_only_and_can_be_turned_off():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        training.configure_backends(torch.device("cpu"), tf32=not before[0])
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
        training.configure_backends(torch.device("cuda"), tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        training.configure_backends(torch.device("cuda", 0), tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.slow
def test_a_compiled_denoiser_trains_like_the_eager_one():
    cfg = _cfg(
        "unused",
        "diffusion.backbone=unet",
        "diffusion.unet.model_channels=16",
        "diffusion.unet.norm_groups=8",
        "diffusion.unet.channel_mult=[1]",
        "diffusion.unet.num_res_blocks=1",
        "diffusion.unet.attention_resolutions=[]",
    ).diffusion
    process, loss_fn = build_process(cfg), LOSSES[cfg.prediction]
    data = torch.randn(3, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        net = training.prepare_network(
            build_network(cfg, 4, 4, 10), torch.device("cpu"), compile=compiled, channels_last=True
        )
        optimizer = build_optimizer(net.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
        losses = []
        for step, x0 in enumerate(data):
            loss = loss_fn(net, process, x0, generator(0, "compile-test", step), y=torch.arange(4))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs[compiled] = losses, net.state_dict()
    (eager, eager_state), (compiled, compiled_state) = runs[False], runs[True]
    assert eager_state.keys() == compiled_state.keys()  # checkpoints and the EMA see the same module
    assert compiled == pytest.approx(eager, abs=1e-5, rel=1e-5)
    for name in eager_state:
        torch.testing.assert_close(compiled_state[name], eager_state[name], atol=1e-5, rtol=1e-5)


def test_a_skipped_fp16_step_lowers_the_loss_scale_and_the_next_step_runs():
    runtime = Runtime(precision="fp16", cpu=True)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = runtime.prepare(model, optimizer)
    scale = runtime.scaler.get_scale()
    runtime.backward(model(torch.ones(2, 3)).sum() * float("nan"))
    runtime.clip_grad_norm(model.parameters(), 1.0, optimizer)  # unscales: sees the NaN gradients
    runtime.skip_step(optimizer)
    assert runtime.scaler.get_scale() == scale / 2  # GradScaler's backoff factor
    before = [p.detach().clone() for p in model.parameters()]
    runtime.backward(model(torch.ones(2, 3)).sum())
    runtime.clip_grad_norm(model.parameters(), 1.0, optimizer)
    runtime.step(optimizer)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
