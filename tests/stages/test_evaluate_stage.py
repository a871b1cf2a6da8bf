"""`latentpipe evaluate` on a tiny real run: every metric present and finite, each phase logged
with its progress, the report (markdown, self-contained HTML, plots) written, a rerun skipped
when up to date; with the real val images as "samples": FID ~0, precision and
recall 1, classifier accuracy equal to its own real-val accuracy."""

import io
import json
import logging
import math
import re
import shutil

import numpy as np
import pytest

from pipeline import artifacts, cli, manifest, report
from pipeline.data.stream import sequential_batches
from pipeline.metrics.images import to_uint8
from stages import evaluate, sample
from tests.stages.test_diffusion_stage import _cfg
from tests.stages.test_sample_stage import SAMPLE_ARGS, _copy, trained  # noqa: F401 (fixture)

EVAL_ARGS = (
    "evaluate.classifier_steps=30",
    "evaluate.likelihood_count=3",
    "evaluate.likelihood_rtol=0.01",
    "evaluate.kid_subsets=5",
    "evaluate.batch_size=16",
)


@pytest.fixture(scope="module")
def sampled(trained, tmp_path_factory):  # noqa: F811
    root = _copy(trained, tmp_path_factory.mktemp("runs"))
    sample.run(_cfg(root, *SAMPLE_ARGS))
    return root


def _cfg_eval(root, *extra):
    return _cfg(root, *SAMPLE_ARGS, *EVAL_ARGS, *extra)


def _copy_sampled(sampled, root):
    shutil.copytree(sampled / "tiny", root / "tiny")
    return root


def test_metrics_are_finite_reported_and_a_rerun_is_skipped(sampled, tmp_path, weights_cache, caplog, monkeypatch):
    cfg = _cfg_eval(_copy_sampled(sampled, tmp_path))
    monkeypatch.setenv("LATENTPIPE_PROGRESS_SECONDS", "0")  # every progress update is a line
    with caplog.at_level(logging.INFO):
        out = evaluate.run(cfg)
    logged = caplog.text
    for phase in (
        "Inception features of the samples",
        "classifier",
        "autoencoder reconstructions",
        "Inception features of the reconstructions",
        "likelihood of 3 val latents",
    ):
        assert re.search(rf"evaluate: {phase}[^\n]*: done in \d:\d\d:\d\d", logged), phase  # start, end
    # progress within a phase: i of N with an ETA (val images in batches of 16; the ODE's position)
    assert re.search(r"autoencoder reconstructions: 16/\d+ val images, elapsed \S+, ETA \d", logged), logged
    assert re.search(r"likelihood of 3 val latents[^\n]*: 0\.\d\d/1\.00 of the log-sigma range, elapsed", logged)
    found = manifest.read(out)
    assert found["status"] == "complete"
    metrics = json.loads((out / artifacts.Evaluation.METRICS_FILE).read_text())
    for key in (
        "fid",
        "kid",
        "precision",
        "recall",
        "fid_train_vs_val",
        "classifier_accuracy",
        "classifier_real_val_accuracy",
        "rfid",
        "autoencoder_val_psnr",
        "autoencoder_val_codebook_usage",
        "latent_bits_per_dim",
    ):
        assert math.isfinite(metrics[key]), key
        assert found["metrics"][key] == metrics[key]
    assert metrics["fid"] > 0 and metrics["rfid"] > 0 and metrics["fid_train_images"] == metrics["samples"] == 11
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert set(metrics["classifier_accuracy_per_class"]) == {str(c) for c in range(10)}
    assert metrics["likelihood_latents"] == 3 and metrics["likelihood_nfe"] > 0
    assert metrics["sampler"]["method"] == "ddpm"
    markdown = (out / artifacts.Evaluation.REPORT_FILE).read_text()
    assert "../sample/grid.png" in markdown and "| fid |" in markdown and "diffusion:" in markdown
    assert "evaluate:" in markdown
    for name in ("samples", "fid", "per_class_accuracy", "autoencoder_training", "diffusion_training"):
        assert f"](plots/{name}.png)" in markdown and (out / "plots" / f"{name}.png").is_file(), name
    assert (out / report.REPORT_HTML).read_text().count("data:image/png;base64,") >= 5
    assert manifest.up_to_date(cfg, evaluate.NAME, evaluate.SECTIONS, evaluate.INPUTS)[0]
    run_id = found["run_id"]
    cli.run_pipeline(cfg)  # every stage up to date: nothing reruns
    assert manifest.read(out)["run_id"] == run_id
    changed = _cfg_eval(tmp_path, "evaluate.kid_subsets=6")
    assert not manifest.up_to_date(changed, evaluate.NAME, evaluate.SECTIONS, evaluate.INPUTS)[0]


def test_real_val_images_as_samples_score_like_real_images(sampled, tmp_path, weights_cache):
    cfg = _cfg_eval(_copy_sampled(sampled, tmp_path), "evaluate.likelihood_count=0", "evaluate.reconstruction=false")
    images, labels = [], []
    for batch in sequential_batches(str(cfg.stage_dir("prepare") / "val-*.tar"), 64):
        images.append(to_uint8(batch["image"]))
        labels.append(np.asarray(batch["label"]))
    buffer = io.BytesIO()
    np.savez(buffer, images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64))
    directory = cfg.stage_dir("sample")
    (directory / artifacts.Samples.SAMPLES_FILE).write_bytes(buffer.getvalue())
    recorded = manifest.read(directory)  # recorded as the sample stage's output (evaluate verifies the sha256)
    recorded["outputs"] = [
        manifest.describe_file(directory / o["path"], directory, count=len(images))
        if o["path"] == artifacts.Samples.SAMPLES_FILE
        else o
        for o in recorded["outputs"]
    ]
    manifest.write(directory, recorded)
    metrics = json.loads((evaluate.run(cfg) / artifacts.Evaluation.METRICS_FILE).read_text())
    assert abs(metrics["fid"]) < 1e-3
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["kid"] <= 0  # the unbiased MMD^2 of a set against itself: the diagonal is left out
    assert metrics["classifier_accuracy"] == pytest.approx(metrics["classifier_real_val_accuracy"])
    assert "rfid" not in metrics and "latent_bits_per_dim" not in metrics
