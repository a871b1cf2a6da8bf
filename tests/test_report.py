"""The evaluation report from a small fake-but-valid run directory (what the stages write:
metrics.jsonl of both training stages, a reconstruction grid, samples.npz, the prepare
manifest, saved configs, evaluate's metrics.json): the plots are real PNGs, the HTML embeds
exactly those bytes and references no file, a part without its input is left out, and
`latentpipe report` rebuilds the same files without touching the metrics."""

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from pipeline import config, report
from pipeline.cli import main

CLASSES = ["cat", "dog", "fish"]


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _run_dir(root, labelled=True):
    run = root / "tiny"
    cfg = config.load(None, [f"experiment.runs_dir={root}"])
    for stage in ("prepare", "autoencoder", "encode", "diffusion", "sample", "evaluate"):
        (run / stage).mkdir(parents=True)
        (run / stage / "config.yaml").write_text(config.to_yaml(cfg))
    (run / "prepare" / "manifest.json").write_text(json.dumps({"classes": CLASSES if labelled else []}))
    _jsonl(
        run / "autoencoder" / "metrics.jsonl",
        [
            {
                "step": s,
                "time": 1000.0 + s,
                "loss": 1 / s,
                "lr": 1e-3,
                "grad_norm": 2.0 / s,
                "images_per_s": 50.0,
                "psnr": 10 + s / 10,
                "lpips": 0.5 - s / 1000,
                "usage": 0.5,
                "perplexity": 20.0,
            }
            for s in range(10, 110, 10)
        ],
    )
    _jsonl(
        run / "diffusion" / "metrics.jsonl",
        [
            {"step": s, "time": 2000.0 + s, "loss": 0.5, "lr": 1e-4 * s, "grad_norm": 1.0, "images_per_s": 80.0}
            for s in range(5, 55, 5)
        ],
    )
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, (2 * 18 + 2, 8 * 18 + 2, 3), dtype=np.uint8)
    (run / "autoencoder" / "images").mkdir()
    for step in (50, 100):
        Image.fromarray(grid).save(run / "autoencoder" / "images" / f"reconstructions-{step:08d}.png")
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(12) % 3 if labelled else np.full(12, -1)
    np.savez(run / "sample" / "samples.npz", images=images, labels=labels)
    Image.fromarray(images[0]).save(run / "sample" / "grid.png")
    metrics = {
        "samples": 12,
        "fid": 80.5,
        "kid": 0.05,
        "kid_std": 0.01,
        "precision": 0.6,
        "recall": 0.3,
        "fid_train_vs_val": 30.2,
        "rfid": 12.0,
        "autoencoder_val_psnr": 24.5,
        "sampler": {"method": "ddim", "steps": 20, "guidance_scale": 2.0, "snap": False, "nfe": 20},
    }
    if labelled:
        metrics |= {
            "classifier_accuracy": 0.7,
            "classifier_real_val_accuracy": 0.9,
            "classifier_accuracy_per_class": {"0": 0.5, "1": 0.75, "2": 0.85},
        }
    (run / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    return run


def _embedded(html):
    return [base64.b64decode(data) for data in re.findall(r"src='data:image/png;base64,([^']+)'", html)]


def test_report_has_every_plot_embedded_and_rebuilds_the_same(tmp_path, capsys):
    run = _run_dir(tmp_path)
    written = report.build(run)
    out = run / "evaluate"
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert plots == {
        "samples.png",
        "fid.png",
        "per_class_accuracy.png",
        "autoencoder_training.png",
        "diffusion_training.png",
        "reconstructions.png",
    }
    for name in plots:
        with Image.open(out / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    markdown, html = written.read_text(), (out / report.REPORT_HTML).read_text()
    assert all(f"](plots/{name})" in markdown for name in plots)
    assert "| fid | 80.5 |" in markdown and "| accuracy | 0.500 | 0.750 | 0.850 |" in markdown
    assert "| class | cat | dog | fish |" in markdown  # class names from the prepare manifest
    assert "evaluate:" in markdown and "diffusion:" in markdown  # the saved config sections
    # self-contained: every image is inline, and inline are exactly the PNGs on disk
    assert "src='plots/" not in html and "<img src='http" not in html
    assert "](../sample/grid.png)" in markdown and "<a href='../sample/grid.png'>" in html  # the full grid: linked
    assert sorted(_embedded(html)) == sorted((out / "plots" / name).read_bytes() for name in plots)

    before = {p: p.read_bytes() for p in [*out.rglob("*"), *(run / "sample").glob("*")] if p.is_file()}
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(written), str(out / report.REPORT_HTML)]
    after = {p: p.read_bytes() for p in before}
    assert after == before  # same inputs, same bytes; metrics.json and the samples untouched


def test_training_panels_follow_the_logged_keys(tmp_path):
    keys = [("loss", "loss"), ("lr", "learning rate")]
    one = report.plots.training_curves([{"step": 1, "loss": 1.0}], keys, "t", tmp_path / "one.png")
    two = report.plots.training_curves([{"step": 1, "loss": 1.0, "lr": 0.1}], keys, "t", tmp_path / "two.png")
    with Image.open(one) as a, Image.open(two) as b:
        assert b.width > a.width  # a second logged key is a second panel
    assert report.plots.training_curves([{"step": 1}], keys, "t", tmp_path / "none.png") is None


def test_unlabelled_run_has_no_class_parts(tmp_path):
    run = _run_dir(tmp_path, labelled=False)
    markdown = report.build(run).read_text()
    assert not (run / "evaluate" / "plots" / "per_class_accuracy.png").exists()
    assert "| class |" not in markdown and "each with the class" not in markdown
    assert (run / "evaluate" / "plots" / "samples.png").is_file()


def test_without_metrics_the_error_names_the_stage(tmp_path, capsys):
    with pytest.raises(report.ReportError, match="latentpipe evaluate"):
        report.build(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "latentpipe evaluate" in capsys.readouterr().err
