"""`latentpipe submit --dry-run` and the job plan: no SLURM needed."""

import json
import shlex
import subprocess
import sys

import pytest

from pipeline import config, manifest, slurm, stage_registry
from pipeline.errors import LatentpipeError


def _cfg(tmp_path, *extra):
    return config.load(overrides=[f"experiment.runs_dir={tmp_path}", *extra])


def _fake_complete(cfg, stage):
    """A manifest that up_to_date accepts (config hash and input hashes match)."""
    spec = stage_registry.get(stage)
    directory = cfg.stage_dir(stage)
    directory.mkdir(parents=True)
    manifest.write(
        directory,
        {
            "stage": stage,
            "status": "complete",
            "config_hash": config.section_hash(cfg, spec.sections),
            "inputs": {name: manifest.manifest_hash(cfg.stage_dir(name)) for name in spec.inputs},
        },
    )


def test_plan_chains_every_stage_with_an_array_for_sample(tmp_path):
    cfg = _cfg(tmp_path)
    jobs, reasons = slurm.plan(cfg, None, ["data.limit=10"], sample_tasks=4, sbatch_args=["--time=5"])
    names = [j.stage for j in jobs]
    order = list(stage_registry.STAGES)
    assert names == [*order[:4], "sample", "sample", *order[5:]]
    assert jobs[0].depends_on is None and all(j.depends_on == i for i, j in enumerate(jobs[1:]))
    array = jobs[names.index("sample")]
    assert array.array and "--array=0-3" in array.argv and not jobs[names.index("sample") + 1].array
    for job in jobs:
        assert "--kill-on-invalid-dep=yes" in job.argv and job.argv[-1] == "data.limit=10"
        assert job.argv[-2] == str(slurm.slurm_dir() / f"{job.stage}.sbatch")
        assert (slurm.slurm_dir() / f"{job.stage}.sbatch").is_file()
        assert job.argv.index("--time=5") < job.argv.index(job.argv[-2])  # user options win over ours
    assert set(reasons.values()) == {"no manifest"}


def test_plan_skips_up_to_date_stages_but_not_after_a_rerun(tmp_path):
    cfg = _cfg(tmp_path)
    _fake_complete(cfg, "prepare")
    jobs, reasons = slurm.plan(cfg, None, [])
    assert jobs[0].stage == "autoencoder" and reasons["prepare"] == "up to date, skipped"
    _fake_complete(cfg, "autoencoder")
    _fake_complete(cfg, "encode")
    jobs, reasons = slurm.plan(cfg, None, [], force=["autoencoder"])
    assert [j.stage for j in jobs][:2] == ["autoencoder", "encode"]  # encode reruns: its input changes
    assert reasons["encode"] == "an earlier stage reruns"
    jobs, _ = slurm.plan(cfg, None, [], only=["diffusion"])
    assert [j.stage for j in jobs] == ["diffusion"]


def test_plan_rejects_unknown_stages_and_bad_task_counts(tmp_path):
    with pytest.raises(LatentpipeError, match="unknown stage"):
        slurm.plan(_cfg(tmp_path), None, [], only=["nope"])
    with pytest.raises(LatentpipeError, match="sample-tasks"):
        slurm.plan(_cfg(tmp_path), None, [], sample_tasks=0)


def test_dry_run_prints_a_runnable_script_and_submits_nothing(tmp_path):
    config_file = tmp_path / "my.yaml"
    config_file.write_text("experiment:\n  name: demo\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "submit",
            "--dry-run",
            "--config",
            str(config_file),
            "--sample-tasks",
            "2",
            "--stages",
            "diffusion,sample",
            "--sbatch=--partition=gpu",
            f"experiment.runs_dir={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "#!/bin/bash" and any(line.startswith("mkdir -p ") for line in lines)
    subs = [line for line in lines if "sbatch" in line and line.startswith("job")]
    assert len(subs) == 3 and "--array=0-1" in subs[1] and "--dependency=afterok:${job0}" in subs[1]
    assert "--dependency=afterok:${job1}" in subs[2] and "--partition=gpu" in subs[2]
    assert all(str(config_file) in sub and "--job-name=demo-" in sub for sub in subs)
    subprocess.run(["bash", "-n"], input=done.stdout, text=True, check=True)
    assert not (tmp_path / "runs").exists()


def test_status_without_submissions_lists_every_stage(tmp_path):
    text = slurm.status(_cfg(tmp_path))
    assert "nothing submitted" in text
    for name in stage_registry.STAGES:
        assert name in text


def test_jobs_file_records_ids_and_dependencies(tmp_path):
    cfg = _cfg(tmp_path)
    jobs, reasons = slurm.plan(cfg, None, [], only=["prepare", "autoencoder"])
    jobs[0].job_id, jobs[1].job_id = "11", "12"
    path = slurm._record(tmp_path, jobs, reasons)
    recorded = json.loads(path.read_text())
    assert [(j["stage"], j["job_id"], j["depends_on"]) for j in recorded["jobs"]] == [
        ("prepare", "11", None),
        ("autoencoder", "12", "11"),
    ]
    assert "--dependency=afterok:11" in recorded["jobs"][1]["command"]


@pytest.mark.parametrize("stage", list(stage_registry.STAGES))
def test_common_sh_forwards_usr1_only_to_stages_that_checkpoint(stage):
    """common.sh asks the registry (python -m pipeline.stage_registry) instead of a list of its own."""
    script = f"""
        source {shlex.quote(str(slurm.slurm_dir() / "common.sh"))}
        LP_STAGE={stage}; LP_CHILD=""
        LP_CHECKPOINTS=$({shlex.quote(sys.executable)} -m pipeline.stage_registry checkpoints {stage})
        lp_forward USR1; echo "signal=$LP_SIGNAL"
    """
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, timeout=60)
    forwarded = stage_registry.get(stage).checkpoints
    assert ("signal=USR1" in done.stdout) == forwarded, done.stdout
    assert ("does not checkpoint, ignored" in done.stdout) == (not forwarded)
