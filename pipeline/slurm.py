"""`latentpipe submit` and `latentpipe status`: the pipeline as a chain of SLURM jobs.

    latentpipe submit [--config X] [--stages a,b] [--sample-tasks N] [--force STAGE] [--sbatch=OPT ...]
                      [--dry-run] [key=value ...]
    latentpipe status [--config X] [key=value ...]

``submit`` runs ``sbatch slurm/<stage>.sbatch [config] [key=value ...]`` for every stage that is
not up to date (a stage after one that is submitted always runs: its input changes), each with
``--dependency=afterok:<previous job>`` and ``--kill-on-invalid-dep=yes`` (a failed stage
cancels its dependents instead of leaving them pending forever). ``sample`` runs as an array
job of N tasks over disjoint chunks followed by one plain ``sample`` job that renders what is
missing and assembles the samples. Job logs go to ``runs/<name>/slurm/``, the job ids to
``runs/<name>/slurm/jobs.json``. ``--dry-run`` prints the sbatch command lines (a runnable
shell script) and needs no SLURM.

``status`` prints each stage's manifest state and the state of its jobs (``scontrol show job``);
for a running training stage also its step/total and ETA, from the stage's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import config, manifest, stage_registry
from pipeline.errors import LatentpipeError
from pipeline.runtime.progress import clock

SLURM_DIR = Path(__file__).resolve().parent / "sbatch"
"""common.sh and one sbatch script per stage: package data, so a wheel install can submit too
(the checkout's top-level ``slurm/`` is a link to it)."""
JOBS_FILE = "jobs.json"
RATE_RECORDS = 10
"""The ETA of a running stage extrapolates the pace of its last this-many log lines."""


@dataclass
class Job:
    stage: str
    argv: list[str]  # sbatch ... script [config] [overrides]; the dependency is added at submit time
    array: bool = False
    job_id: str | None = None
    depends_on: int | None = None  # index of the job this one waits for


def slurm_dir() -> Path:
    return Path(os.environ.get("LATENTPIPE_SLURM_DIR", SLURM_DIR))


def plan(
    cfg: config.Config,
    config_path: str | None,
    overrides: Sequence[str],
    only: Sequence[str] = (),
    force: Sequence[str] = (),
    sample_tasks: int = 1,
    sbatch_args: Sequence[str] = (),
) -> tuple[list[Job], dict]:
    """The jobs to submit, in order, and why each stage is (not) submitted."""
    unknown = [name for name in only if name not in stage_registry.STAGES]
    if unknown:
        raise LatentpipeError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(stage_registry.STAGES)}")
    if sample_tasks < 1:
        raise LatentpipeError(f"--sample-tasks must be at least 1, got {sample_tasks}")
    log_dir = cfg.run_dir.resolve() / "slurm"
    tail = ([str(Path(config_path).resolve())] if config_path else []) + list(overrides)
    jobs: list[Job] = []
    reasons: dict[str, str] = {}
    for spec in stage_registry.PIPELINE:
        if only and spec.name not in only:
            reasons[spec.name] = "not selected"
            continue
        fresh, why = manifest.up_to_date(cfg, spec.name, spec.sections, spec.inputs)
        if fresh and not jobs and spec.name not in force:
            reasons[spec.name] = "up to date, skipped"
            continue
        reasons[spec.name] = "forced" if spec.name in force else why if not fresh else "an earlier stage reruns"
        script = str(slurm_dir() / f"{spec.name}.sbatch")
        name = f"{cfg.experiment.name}-{spec.name}"
        common = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes", f"--job-name={name}"]
        if spec.name == "sample" and sample_tasks > 1:
            jobs.append(
                Job(
                    spec.name,
                    [
                        *common,
                        f"--array=0-{sample_tasks - 1}",
                        f"--output={log_dir}/%x-%A_%a.out",
                        *sbatch_args,
                        script,
                        *tail,
                    ],
                    array=True,
                    depends_on=len(jobs) - 1 if jobs else None,
                )
            )
        jobs.append(
            Job(
                spec.name,
                [*common, f"--output={log_dir}/%x-%j.out", *sbatch_args, script, *tail],
                depends_on=len(jobs) - 1 if jobs else None,
            )
        )
    return jobs, reasons


def _argv(job: Job, jobs: Sequence[Job]) -> list[str]:
    if job.depends_on is None:
        return job.argv
    return [job.argv[0], job.argv[1], f"--dependency=afterok:{jobs[job.depends_on].job_id}", *job.argv[2:]]


def dry_run_script(cfg: config.Config, jobs: Sequence[Job]) -> str:
    lines = [
        "#!/bin/bash",
        "set -e",
        f"export LATENTPIPE_SLURM_DIR={shlex.quote(str(slurm_dir()))}",
        f"mkdir -p {shlex.quote(str(cfg.run_dir.resolve() / 'slurm'))}",
    ]
    for number, job in enumerate(jobs):
        shown = [shlex.quote(a) for a in job.argv]
        if job.depends_on is not None:
            shown.insert(2, f"--dependency=afterok:${{job{job.depends_on}}}")
        lines.append(
            f"job{number}=$({' '.join(shown)} | cut -d';' -f1)   # {job.stage}{' (array)' if job.array else ''}"
        )
    return "\n".join(lines)


def submit(cfg: config.Config, jobs: list[Job], reasons: dict) -> Path:
    if shutil.which("sbatch") is None:
        raise LatentpipeError(
            "sbatch not found: run on a SLURM login node (or start tools/local_slurm), "
            "or use --dry-run to see the commands"
        )
    directory = cfg.run_dir.resolve() / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LATENTPIPE_SLURM_DIR=str(slurm_dir()))
    env.setdefault("LATENTPIPE_PYTHON", sys.executable)
    for job in jobs:
        argv = _argv(job, jobs)
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            _record(directory, jobs, reasons)
            raise LatentpipeError(
                f"sbatch failed for stage {job.stage} ({done.stderr.strip() or done.stdout.strip()}): "
                f"{shlex.join(argv)}"
            )
        job.job_id = done.stdout.strip().split(";")[0]
    return _record(directory, jobs, reasons)


def _record(directory: Path, jobs: Sequence[Job], reasons: dict) -> Path:
    path = directory / JOBS_FILE
    record = {
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stages": reasons,
        "jobs": [
            {
                "stage": j.stage,
                "job_id": j.job_id,
                "array": j.array,
                "depends_on": None if j.depends_on is None else jobs[j.depends_on].job_id,
                "command": shlex.join(_argv(j, jobs)) if j.job_id else None,
            }
            for j in jobs
        ],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def job_states(job_id: str) -> list[dict]:
    """One dict per job (array: per task) from `scontrol show job -o`: JobId, JobState, Reason, ExitCode, ..."""
    if shutil.which("scontrol") is None:
        return []
    done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    found = []
    for line in done.stdout.splitlines():
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        if fields:
            found.append(fields)
    return found


def training_progress(stage_dir: Path, total: int, now: float | None = None) -> str | None:
    """``step s/total (p%), ETA h:mm:ss, last log m s ago`` of a training stage, from the log
    lines of its metrics.jsonl (``step`` and wall-clock ``time``); None before the first one."""
    path = stage_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = [json.loads(line) for line in lines[-RATE_RECORDS:] if line.strip()]
    if not records:
        return None
    first, last = records[0], records[-1]
    text = f"step {last['step']}/{total} ({last['step'] / total:.0%})"
    elapsed, steps = last["time"] - first["time"], last["step"] - first["step"]
    if elapsed > 0 and steps > 0:
        text += f", ETA {clock((total - last['step']) * elapsed / steps)}"
    return text + f", last log {clock((time.time() if now is None else now) - last['time'])} ago"


def status(cfg: config.Config) -> str:
    path = cfg.run_dir / "slurm" / JOBS_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {"jobs": []}
    lines = [f"{cfg.run_dir}" + (f" (submitted {recorded['submitted']})" if path.is_file() else " (nothing submitted)")]
    for spec in stage_registry.PIPELINE:
        found = manifest.read(cfg.stage_dir(spec.name))
        fresh, why = manifest.up_to_date(cfg, spec.name, spec.sections, spec.inputs)
        state = (found or {}).get("status", "-")
        lines.append(f"  {spec.name:<12} manifest {state:<12} {'up to date' if fresh else why}")
        total = getattr(getattr(cfg, spec.name, None), "max_steps", None)
        progress = training_progress(cfg.stage_dir(spec.name), total) if state == manifest.RUNNING and total else None
        if progress:
            lines.append(f"  {'':<12} {progress}")
        for job in recorded["jobs"]:
            if job["stage"] != spec.name or not job["job_id"]:
                continue
            tasks = job_states(job["job_id"])
            if not tasks:
                text = "unknown (not in scontrol; gone or no SLURM here)"
            else:
                counts: dict[str, int] = {}
                for task in tasks:
                    counts[task.get("JobState", "?")] = counts.get(task.get("JobState", "?"), 0) + 1
                text = ", ".join(f"{n} {s}" if len(tasks) > 1 else s for s, n in counts.items())
                first = tasks[0]
                extra = [
                    f"{k}={first[k]}"
                    for k in ("Reason", "ExitCode", "Restarts")
                    if first.get(k) not in (None, "None", "0", "0:0")
                ]
                if extra:
                    text += f" ({' '.join(extra)})"
            kind = "array " if job["array"] else ""
            lines.append(f"  {'':<12} {kind}job {job['job_id']}: {text}")
    return "\n".join(lines)


def add_parsers(commands) -> None:
    """`submit` and `status` subcommands for pipeline.cli."""
    sub = commands.add_parser(
        "submit",
        help="submit the pipeline to SLURM as a chain of dependent jobs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("--stages", default="", help="comma-separated stages to submit (default: all)")
    sub.add_argument(
        "--sample-tasks", type=int, default=1, help="array tasks for the sample stage (default 1: no array)"
    )
    sub.add_argument("--force", action="append", default=[], metavar="STAGE", help="submit STAGE even if up to date")
    sub.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPT",
        help="extra sbatch option for every job, e.g. --sbatch=--partition=gpu (repeatable)",
    )
    sub.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    sub.add_argument("--config", help="experiment YAML (default: the embedded tiny experiment)")
    sub.add_argument("overrides", nargs="*", metavar="key=value")
    stat = commands.add_parser("status", help="manifest state and SLURM job state of every stage")
    stat.add_argument("--config", help="experiment YAML (default: the embedded tiny experiment)")
    stat.add_argument("overrides", nargs="*", metavar="key=value")


def dispatch(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    if args.command == "status":
        print(status(cfg))
        return 0
    only = [s.strip() for s in args.stages.split(",") if s.strip()]
    jobs, reasons = plan(cfg, args.config, args.overrides, only, args.force, args.sample_tasks, args.sbatch)
    for stage, why in reasons.items():
        print(f"# {stage}: {why}", file=sys.stderr)
    if args.dry_run:
        print(dry_run_script(cfg, jobs))
        return 0
    if not jobs:
        print("nothing to submit: every selected stage is up to date", file=sys.stderr)
        return 0
    path = submit(cfg, jobs, reasons)
    for job in jobs:
        print(f"{job.stage}{' (array)' if job.array else ''}: {job.job_id}")
    print(f"# job ids in {path}", file=sys.stderr)
    return 0


def _manifest_status(argv: Sequence[str]) -> int:
    """`python -m pipeline.slurm manifest-status STAGE [--config X] [key=value ...]` (for slurm/common.sh)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.slurm manifest-status")
    parser.add_argument("stage")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    found = manifest.read(config.load(args.config, args.overrides).stage_dir(args.stage))
    print((found or {}).get("status", "missing"))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["manifest-status"]:
        sys.exit(_manifest_status(sys.argv[2:]))
    sys.exit("usage: python -m pipeline.slurm manifest-status STAGE [--config X] [key=value ...]")
