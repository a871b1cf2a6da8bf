"""`latentpipe prepare` and `latentpipe run` end to end, through the installed command."""

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline import manifest
from pipeline.cli import main
from pipeline.data.stream import ShardLoader

LATENTPIPE = [sys.executable, "-m", "pipeline.cli"]


def test_prepare_builtin_mnist_end_to_end(tmp_path):
    result = subprocess.run(
        [*LATENTPIPE, "-q", "prepare", f"experiment.runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    assert result.returncode == 0, result.stderr
    directory = tmp_path / "tiny" / "prepare"
    found = manifest.read(directory)
    assert found["status"] == "complete"
    assert found["metrics"]["train_count"] + found["metrics"]["val_count"] == 5000
    assert found["classes"] == [str(d) for d in range(10)]
    assert all(n > 0 for n in found["splits"]["train"]["class_counts"].values())
    loader = ShardLoader(
        str(directory / "train-*.tar"), batch_size=50, samples_per_epoch=found["metrics"]["train_count"]
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (50, 1, 32, 32) and batch["label"].max() < 10
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0


def _started(cfg_dir):
    return json.loads((cfg_dir / "manifest.json").read_text())["started_at"], manifest.manifest_hash(cfg_dir)


def test_run_skips_complete_stages_and_reruns_after_a_config_change(tmp_path, caplog):
    args = [
        f"experiment.runs_dir={tmp_path}",
        "data.source=digits",
        "data.limit=60",
        "data.resolution=8",
        "autoencoder.lpips=none",
        "autoencoder.channels=8",
        "autoencoder.max_steps=2",
        "autoencoder.batch_size=4",
        "autoencoder.num_workers=0",
        "autoencoder.num_codes=16",
    ]
    prepared, trained = tmp_path / "tiny" / "prepare", tmp_path / "tiny" / "autoencoder"
    assert main(["run", "--until", "autoencoder", *args]) == 0
    first = {d: manifest.manifest_hash(d) for d in (prepared, trained)}

    caplog.clear()
    assert main(["run", "--until", "autoencoder", *args]) == 0
    assert "prepare: up to date, skipped" in caplog.text and "autoencoder: up to date, skipped" in caplog.text
    assert {d: manifest.manifest_hash(d) for d in (prepared, trained)} == first

    caplog.clear()  # an autoencoder-only change reruns the autoencoder alone
    assert main(["run", "--until", "autoencoder", *args, "autoencoder.max_steps=3"]) == 0
    assert "prepare: up to date, skipped" in caplog.text
    assert manifest.read(trained)["metrics"]["steps"] == 3

    changed = manifest.manifest_hash(trained)  # a data change reruns prepare and everything after it
    assert main(["run", "--until", "autoencoder", *args, "autoencoder.max_steps=3", "data.resolution=12"]) == 0
    assert manifest.manifest_hash(prepared) != first[prepared]
    assert manifest.manifest_hash(trained) != changed
    assert manifest.read(trained)["image"]["resolution"] == 12

    rerun = manifest.manifest_hash(prepared)
    assert (
        main(
            [
                "run",
                "--until",
                "autoencoder",
                "--force",
                "prepare",
                *args,
                "autoencoder.max_steps=3",
                "data.resolution=12",
            ]
        )
        == 0
    )
    assert manifest.manifest_hash(prepared) != rerun


def test_stage_errors_exit_nonzero_with_the_fix(tmp_path, capsys):
    code = main(
        ["prepare", f"experiment.runs_dir={tmp_path}", "data.source=folder", f"data.path={tmp_path / 'missing'}"]
    )
    assert code == 2
    assert "not a directory" in capsys.readouterr().err


def test_help_everywhere(capsys):
    for argv in (["--help"], ["run", "--help"], ["prepare", "--help"], ["data", "inspect", "--help"]):
        try:
            main(argv)
        except SystemExit as exit_:
            assert exit_.code == 0
    assert "PATH|PATTERN|URL" in capsys.readouterr().out
