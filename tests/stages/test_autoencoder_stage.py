"""`latentpipe autoencoder` end to end on real digits: outputs, exact resume, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline import artifacts, config, manifest
from pipeline.autoencoder.build import build_autoencoder
from pipeline.errors import LatentpipeError, StageInterrupted
from pipeline.runtime import checkpoint
from pipeline.runtime.optim import lr_factor
from pipeline.runtime.training import NonFiniteLossError
from stages import autoencoder, prepare
from tests.support import signal_before_step

TINY = [
    "data.source=digits",
    "data.limit=300",
    "data.resolution=16",
    "data.workers=0",
    "autoencoder.channels=8",
    "autoencoder.channel_mult=[1,2,2]",
    "autoencoder.num_codes=32",
    "autoencoder.batch_size=8",
    "autoencoder.num_workers=0",
    "autoencoder.shuffle_buffer=50",
    "autoencoder.log_every=2",
    "autoencoder.image_every=4",
    "autoencoder.checkpoint_every=3",
    "autoencoder.dead_code_steps=3",
    "autoencoder.dropout=0.1",
]


def _cfg(root, *overrides):
    return config.load(overrides=[f"experiment.runs_dir={root}", *TINY, *overrides])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    prepare.run(_cfg(root))
    return root


def _fresh_copy(prepared, tmp_path):
    """A run directory holding only the shared prepare output."""
    import shutil

    shutil.copytree(prepared / "tiny" / "prepare", tmp_path / "tiny" / "prepare")
    return tmp_path


@pytest.mark.parametrize("kind, precision", [("vq", "fp32"), ("kl", "fp32"), ("vq", "bf16"), ("vq", "fp16")])
def test_trains_exports_and_reports(prepared, tmp_path, lpips_cache, kind, precision):
    cfg = _cfg(
        _fresh_copy(prepared, tmp_path),
        f"autoencoder.kind={kind}",
        "autoencoder.max_steps=6",
        f"autoencoder.mixed_precision={precision}",
    )
    out = autoencoder.run(cfg)
    found = manifest.read(out)
    assert found["status"] == "complete" and found["metrics"]["steps"] == 6
    assert found["metrics"]["val_images"] == manifest.read(cfg.stage_dir("prepare"))["metrics"]["val_count"]
    assert {"val_psnr", "val_ssim", "val_lpips"} <= set(found["metrics"])
    if kind == "vq":
        assert 0 < found["metrics"]["val_codebook_usage"] <= 1
    assert found["latent"] == {"channels": 4, "resolution": 4, "kind": kind}
    model = build_autoencoder(cfg.autoencoder, 1)
    model.load_state_dict(load_file(out / artifacts.TrainedAutoencoder.WEIGHTS_FILE))
    assert (out / "metrics.jsonl").read_text().count("\n") == 3
    assert list((out / "images").glob("reconstructions-*.png"))


def test_the_learning_rate_follows_the_configured_schedule(prepared, tmp_path, lpips_cache):
    cfg = _cfg(
        _fresh_copy(prepared, tmp_path),
        "autoencoder.max_steps=6",
        "autoencoder.lr_schedule=cosine",
        "autoencoder.warmup_steps=2",
        "autoencoder.lpips=none",
    )
    out = autoencoder.run(cfg)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ae = cfg.autoencoder
    # the rate logged at step s is the one the next step (s, counted from 0) will use
    expected = [ae.learning_rate * lr_factor(s, warmup_steps=2, total_steps=6, kind="cosine") for s in (2, 4, 6)]
    assert [row["lr"] for row in logged] == pytest.approx(expected)
    assert expected[-1] == 0.0


def test_interrupted_and_resumed_equals_uninterrupted(prepared, tmp_path, lpips_cache, monkeypatch):
    # a schedule with a warm-up: the resumed run must also pick up the schedule where it stopped
    schedule = ("autoencoder.max_steps=8", "autoencoder.lr_schedule=cosine", "autoencoder.warmup_steps=3")
    reference = _cfg(_fresh_copy(prepared, tmp_path / "a"), *schedule)
    autoencoder.run(reference)
    expected = load_file(reference.stage_dir("autoencoder") / artifacts.TrainedAutoencoder.WEIGHTS_FILE)

    cfg = _cfg(_fresh_copy(prepared, tmp_path / "b"), *schedule)
    signal_before_step(monkeypatch, 5)
    with pytest.raises(StageInterrupted, match="step 5"):
        autoencoder.run(cfg)
    assert manifest.read(cfg.stage_dir("autoencoder"))["status"] == "interrupted"
    monkeypatch.undo()
    autoencoder.run(cfg)
    resumed = load_file(cfg.stage_dir("autoencoder") / artifacts.TrainedAutoencoder.WEIGHTS_FILE)
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


def test_non_finite_losses_are_skipped_then_stop_the_stage(prepared, tmp_path, lpips_cache, monkeypatch):
    cfg = _cfg(_fresh_copy(prepared, tmp_path), "autoencoder.max_steps=20", "autoencoder.max_nonfinite_steps=3")
    real = autoencoder.Objective.__call__
    calls = {"n": 0}

    def sometimes_nan(self, model, x, gen):
        calls["n"] += 1
        loss, x_hat, terms, counts = real(self, model, x, gen)
        return (loss * float("nan") if calls["n"] in (2, 5, 6, 7) else loss), x_hat, terms, counts

    monkeypatch.setattr(autoencoder.Objective, "__call__", sometimes_nan)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        autoencoder.run(cfg)


def test_non_finite_losses_can_roll_back_with_a_lower_learning_rate(prepared, tmp_path, monkeypatch):
    cfg = _cfg(
        _fresh_copy(prepared, tmp_path),
        "autoencoder.max_steps=8",
        "autoencoder.max_nonfinite_steps=2",
        "autoencoder.on_nonfinite=rollback",
        "autoencoder.lpips=none",
    )
    real = autoencoder.Objective.__call__
    calls = {"n": 0}

    def nan_after_first_checkpoint(self, model, x, gen):
        calls["n"] += 1
        loss, x_hat, terms, counts = real(self, model, x, gen)
        return (loss * float("nan") if calls["n"] in (5, 6) else loss), x_hat, terms, counts  # step 4, twice

    monkeypatch.setattr(autoencoder.Objective, "__call__", nan_after_first_checkpoint)
    found = manifest.read(autoencoder.run(cfg))
    assert found["metrics"]["rollbacks"] == 1 and found["metrics"]["skipped_steps"] == 2
    assert found["metrics"]["steps"] == 8
    final = checkpoint.latest(cfg.stage_dir("autoencoder") / "checkpoints") / "state.pt"
    groups = torch.load(final, weights_only=True)["model"]["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.5 * cfg.autoencoder.learning_rate] * len(groups)


def test_resolution_not_divisible_by_the_factor_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "data.resolution=12", "autoencoder.channel_mult=[1,1,1,1]")
    prepare.run(cfg)
    with pytest.raises(LatentpipeError, match="f=8, which does not divide the prepared resolution 12"):
        autoencoder.run(cfg)


def test_missing_lpips_weights_fail_before_training_with_the_fetch_command(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTPIPE_CACHE", str(tmp_path / "empty-cache"))
    cfg = _cfg(_fresh_copy(prepared, tmp_path))
    with pytest.raises(LatentpipeError, match="latentpipe weights fetch"):
        autoencoder.run(cfg)
    assert not (cfg.stage_dir("autoencoder") / "checkpoints").exists()


def test_refuses_to_start_without_prepare(tmp_path):
    with pytest.raises(manifest.StageInputError, match="run `latentpipe prepare` first"):
        autoencoder.run(_cfg(tmp_path))


def test_checkpoints_from_another_config_are_set_aside_not_resumed(prepared, tmp_path, lpips_cache, caplog):
    caplog.set_level("INFO")
    root = _fresh_copy(prepared, tmp_path)
    autoencoder.run(_cfg(root, "autoencoder.max_steps=3"))
    directory = root / "tiny" / "autoencoder"
    autoencoder.run(_cfg(root, "autoencoder.max_steps=6"))  # a longer budget continues
    assert not (directory / "checkpoints.stale").exists()
    assert "resumed from" in caplog.text

    caplog.clear()
    autoencoder.run(_cfg(root, "autoencoder.max_steps=6", "autoencoder.commitment_beta=0.5"))
    assert "moved to" in caplog.text and "resumed from" not in caplog.text
    assert sorted(p.name for p in (directory / "checkpoints.stale").iterdir()) == ["step-00000003", "step-00000006"]
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(prepared, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    args = ("autoencoder.max_steps=8", "autoencoder.checkpoint_every=2", "autoencoder.lpips=none")
    reference = _cfg(_fresh_copy(prepared, tmp_path / "a"), *args)
    expected = load_file(autoencoder.run(reference) / artifacts.TrainedAutoencoder.WEIGHTS_FILE)

    cfg = _cfg(_fresh_copy(prepared, tmp_path / "b"), *args)
    signal_before_step(monkeypatch, 5)
    with pytest.raises(StageInterrupted):
        autoencoder.run(cfg)
    monkeypatch.undo()
    newest = checkpoint.latest(cfg.stage_dir("autoencoder") / "checkpoints")
    assert newest.name == "step-00000005"
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    found = manifest.read(autoencoder.run(cfg))
    assert found["status"] == "complete" and found["metrics"]["steps"] == 8
    assert "unreadable" in caplog.text and "resumed from" in caplog.text and "step-00000004" in caplog.text
    resumed = load_file(cfg.stage_dir("autoencoder") / artifacts.TrainedAutoencoder.WEIGHTS_FILE)
    for name in expected:  # steps 4..8 again from the older checkpoint: the same weights
        assert torch.equal(resumed[name], expected[name]), name
