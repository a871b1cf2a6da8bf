"""`latentpipe diffusion`: trains on the latents, resumes exactly, survives non-finite steps,
refuses foreign latents; the trained model loads for sampling."""

import io
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import artifacts, config, manifest
from pipeline.diffusion.build import LOSSES
from pipeline.errors import LatentpipeError, StageInterrupted
from pipeline.runtime import checkpoint
from pipeline.runtime.training import NonFiniteLossError
from stages import autoencoder, diffusion, encode, prepare
from tests.support import free_port, signal_before_step

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
    "encode.batch_size=16",
    "diffusion.backbone=dit",
    "diffusion.dit.width=32",
    "diffusion.dit.depth=2",
    "diffusion.dit.num_heads=2",
    "diffusion.dit.patch_size=1",
    "diffusion.batch_size=8",
    "diffusion.max_steps=8",
    "diffusion.num_workers=0",
    "diffusion.warmup_steps=2",
    "diffusion.ema_warmup_steps=0",
    "diffusion.log_every=2",
    "diffusion.checkpoint_every=3",
    "diffusion.image_every=1000",
    "diffusion.shuffle_buffer=50",
]


def _cfg(root, *extra):
    return config.load(overrides=[f"experiment.runs_dir={root}", *ARGS, *extra])


def _encoded(root, *extra):
    cfg = _cfg(root, *extra)
    prepare.run(cfg)
    autoencoder.run(cfg)
    encode.run(cfg)
    return root


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    return _encoded(tmp_path_factory.mktemp("runs"))


def _copy(source, root):
    for stage in ("prepare", "autoencoder", "encode"):
        shutil.copytree(source / "tiny" / stage, root / "tiny" / stage)
    return root


def test_trains_exports_ema_weights_and_loads_for_sampling(encoded, tmp_path):
    cfg = _cfg(_copy(encoded, tmp_path))
    out = diffusion.run(cfg)
    found = manifest.read(out)
    assert found["status"] == "complete" and found["metrics"]["steps"] == 8
    assert found["denoiser"]["num_classes"] == 10 and found["denoiser"]["latent_shape"] == [4, 4, 4]
    assert (out / "images" / "samples-00000008.png").is_file()
    weights = load_file(out / artifacts.TrainedDenoiser.WEIGHTS_FILE)
    trained = artifacts.load_trained(cfg, "cpu")
    for name, value in trained.denoiser.net.state_dict().items():
        assert torch.equal(value, weights[name]), name
    x = torch.randn(3, *trained.shape)
    denoised = trained.denoiser(x, torch.full((3,), 2.0), y=torch.tensor([0, 1, 10]))
    assert denoised.shape == x.shape and torch.isfinite(denoised).all()
    assert 0 < trained.sigma_min < trained.sigma_max


def test_interrupted_and_resumed_equals_uninterrupted(encoded, tmp_path, monkeypatch):
    reference = _cfg(_copy(encoded, tmp_path / "a"))
    expected = load_file(diffusion.run(reference) / artifacts.TrainedDenoiser.WEIGHTS_FILE)

    cfg = _cfg(_copy(encoded, tmp_path / "b"))
    signal_before_step(monkeypatch, 5)
    with pytest.raises(StageInterrupted, match="step 5"):
        diffusion.run(cfg)
    assert manifest.read(cfg.stage_dir("diffusion"))["status"] == "interrupted"
    monkeypatch.undo()
    resumed = load_file(diffusion.run(cfg) / artifacts.TrainedDenoiser.WEIGHTS_FILE)
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


def test_non_finite_steps_roll_back_with_a_lower_learning_rate(encoded, tmp_path, monkeypatch):
    cfg = _cfg(_copy(encoded, tmp_path), "diffusion.max_nonfinite_steps=2", "diffusion.max_steps=10")
    real = LOSSES["v"]
    calls = {"n": 0}

    def nan_after_first_checkpoint(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (5, 6) else loss  # steps 4 and 4 again

    monkeypatch.setitem(LOSSES, "v", nan_after_first_checkpoint)
    found = manifest.read(diffusion.run(cfg))
    assert found["metrics"]["rollbacks"] == 1 and found["metrics"]["skipped_steps"] == 2
    assert found["metrics"]["steps"] == 10


def test_too_many_non_finite_steps_stop_with_a_clear_error(encoded, tmp_path, monkeypatch):
    cfg = _cfg(_copy(encoded, tmp_path), "diffusion.max_nonfinite_steps=2", "diffusion.on_nonfinite=stop")
    real = LOSSES["v"]
    monkeypatch.setitem(LOSSES, "v", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row"):
        diffusion.run(cfg)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(encoded, tmp_path, monkeypatch, caplog):
    cfg = _cfg(_copy(encoded, tmp_path), "diffusion.checkpoint_every=2")
    signal_before_step(monkeypatch, 5)
    with pytest.raises(StageInterrupted):
        diffusion.run(cfg)
    monkeypatch.undo()
    newest = checkpoint.latest(cfg.stage_dir("diffusion") / "checkpoints")
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    found = manifest.read(diffusion.run(cfg))
    assert found["status"] == "complete" and found["metrics"]["steps"] == 8
    assert "unreadable" in caplog.text


def test_gradient_accumulation_counts_optimiser_steps(encoded, tmp_path):
    found = manifest.read(
        diffusion.run(
            _cfg(
                _copy(encoded, tmp_path),
                "diffusion.gradient_accumulation_steps=2",
                "diffusion.max_steps=4",
                "diffusion.backbone=unet",
                "diffusion.unet.model_channels=16",
                "diffusion.unet.norm_groups=8",
            )
        )
    )
    assert found["metrics"]["steps"] == 4 and found["denoiser"]["backbone"] == "unet"


def test_refuses_latents_of_another_autoencoder(encoded, tmp_path):
    root = _copy(encoded, tmp_path)
    autoencoder.run(_cfg(root, "experiment.seed=1"))  # a new autoencoder; the latents are now stale
    with pytest.raises(LatentpipeError, match="rerun `latentpipe encode`"):
        diffusion.run(_cfg(root, "experiment.seed=1"))


def test_load_trained_refuses_another_diffusion_config(encoded, tmp_path):
    root = _copy(encoded, tmp_path)
    diffusion.run(_cfg(root))
    with pytest.raises(LatentpipeError, match="rerun `latentpipe diffusion`"):
        artifacts.load_trained(_cfg(root, "diffusion.prediction=eps"), "cpu")


def _poison_one_sample(shard):
    """Rewrite a KL latent shard with NaN in the first sample's posterior mean (bad data), and its
    manifest entry (the shard is bad data, not a damaged file, which readers refuse)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = next(m for m, _ in members if m.name.endswith(".mean.npy"))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member is first:
                array = np.load(io.BytesIO(data))
                array[:] = np.nan
                buffer = io.BytesIO()
                np.save(buffer, array)
                data = buffer.getvalue()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    directory = shard.parent.parent  # as if encode had written it so: recorded, not a damaged file
    found = manifest.read(directory)
    for entry in found["outputs"]:
        if entry["path"] == str(shard.relative_to(directory)):
            entry.update(manifest.describe_file(shard, directory))
    manifest.write(directory, found)


def test_two_ranks_skip_a_nan_batch_together_and_finish(tmp_path):
    kl = ("autoencoder.kind=kl", "diffusion.max_steps=12")
    root = _encoded(tmp_path, *kl)
    _poison_one_sample(sorted((root / "tiny" / "encode" / artifacts.EncodedLatents.LATENT_DIR).glob("train-*.tar"))[0])
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
            "diffusion",
            f"experiment.runs_dir={root}",
            *ARGS,
            *kl,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = manifest.read(root / "tiny" / "diffusion")
    assert found["status"] == "complete" and found["metrics"]["steps"] == 12
    assert found["metrics"]["skipped_steps"] >= 1
    assert all(
        torch.isfinite(v).all()
        for v in load_file(root / "tiny" / "diffusion" / artifacts.TrainedDenoiser.WEIGHTS_FILE).values()
    )
