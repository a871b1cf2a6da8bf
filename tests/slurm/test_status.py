"""`latentpipe status` shows a running training stage's step/total and ETA from its
metrics.jsonl (the pace of its last log lines), next to the manifest state; a stage that is
not running shows none."""

import json

from pipeline import config, manifest, slurm
from pipeline.cli import main


def _stage(cfg, stage, status, steps_and_times):
    directory = cfg.stage_dir(stage)
    directory.mkdir(parents=True)
    manifest.write(directory, {"stage": stage, "status": status})
    (directory / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "time": t, "loss": 0.1}) + "\n" for s, t in steps_and_times)
    )


def test_eta_extrapolates_the_pace_of_the_last_log_lines(tmp_path):
    directory = tmp_path / "stage"
    directory.mkdir()
    # 100 steps per 10 s at first, then 100 per 20 s: only the last RATE_RECORDS lines count
    records = [(100 * i, 10.0 * i) for i in range(1, 21)] + [(2000 + 100 * i, 200.0 + 20 * i) for i in range(1, 11)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": t}) + "\n" for s, t in records))
    progress = slurm.training_progress(directory, 4000, now=410.0)
    assert progress == "step 3000/4000 (75%), ETA 0:03:20, last log 0:00:10 ago"
    (directory / "metrics.jsonl").write_text("")
    assert slurm.training_progress(directory, 4000) is None


def test_status_shows_step_and_eta_of_a_running_stage_only(tmp_path, capsys):
    overrides = [f"experiment.runs_dir={tmp_path}", "autoencoder.max_steps=1000", "diffusion.max_steps=500"]
    cfg = config.load(None, overrides)
    _stage(cfg, "autoencoder", manifest.COMPLETE, [(1000, 100.0)])
    _stage(cfg, "diffusion", manifest.RUNNING, [(100, 1000.0), (200, 1010.0), (300, 1020.0)])
    assert main(["status", *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:3] == ["diffusion", "manifest", "running"])
    assert lines[at + 1].strip().split(", ")[:2] == ["step 300/500 (60%)", "ETA 0:00:20"]
    assert not any("step 1000/1000" in line for line in lines)  # the complete autoencoder shows no progress
