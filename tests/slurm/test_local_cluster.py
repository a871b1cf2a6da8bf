"""slurm/*.sbatch, `latentpipe submit/status` and preemption/requeue against a REAL SLURM cluster:
tools/local_slurm runs munged + slurmctld + two slurmd (nodes n1, n2) on this machine.

Skipped when SLURM is not installed or we are not root, unless LATENTPIPE_REQUIRE_SLURM=1 (CI),
which turns the skip into a failure. All tests share one cluster (xdist group "slurm", one
worker), every wait has a deadline, and the cluster is stopped and its logs printed at the end,
also when a test fails.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import slurm

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "local_slurm"
BASE = Path(os.environ.get("LOCAL_SLURM_BASE", "/tmp/latentpipe-slurm"))
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]

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
    "diffusion.unet.model_channels=16",
    "diffusion.unet.norm_groups=8",
    "diffusion.batch_size=8",
    "diffusion.max_steps=8",
    "diffusion.num_workers=0",
    "diffusion.checkpoint_every=3",
    "diffusion.image_every=1000",
    "sample.num_samples=12",
    "sample.chunk_size=4",
    "sample.steps=4",
    "evaluate.likelihood_count=0",
    "evaluate.classifier=false",
    "evaluate.fid=false",
    "evaluate.reconstruction=false",
]
SBATCH = ["--sbatch=--cpus-per-task=1", "--sbatch=--time=10"]


def _unavailable() -> str | None:
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    if missing:
        return (
            f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        return "the local cluster's slurmd must run as root (no root, no sudo)"
    return None


def _logs() -> str:
    done = subprocess.run(
        [str(TOOL), "logs"],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, LOCAL_SLURM_BASE=str(BASE), LOCAL_SLURM_LOG_LINES="80"),
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def cluster():
    reason = _unavailable()
    if reason:
        if os.environ.get("LATENTPIPE_REQUIRE_SLURM") == "1":
            pytest.fail(f"LATENTPIPE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    # one cluster per machine (fixed ports, /etc/hosts): a second test session waits for the first
    lock = open(f"{BASE}.lock", "w")
    end = time.monotonic() + 900
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > end:
                pytest.fail(f"another test session held {BASE}.lock (the local cluster) for 900 s")
            time.sleep(1)
    env = dict(os.environ, LOCAL_SLURM_BASE=str(BASE))
    started = subprocess.run([str(TOOL), "start"], capture_output=True, text=True, timeout=180, env=env)
    if started.returncode != 0:
        subprocess.run([str(TOOL), "stop"], capture_output=True, text=True, timeout=120, env=env)
        lock.close()
        pytest.fail(f"tools/local_slurm start failed:\n{started.stdout}\n{started.stderr}")
    try:
        yield BASE
    finally:
        print("\n==== local slurm logs ====\n" + _logs(), file=sys.stderr)
        try:
            stopped = subprocess.run([str(TOOL), "stop"], capture_output=True, text=True, timeout=120, env=env)
            print(stopped.stdout + stopped.stderr, file=sys.stderr)
        finally:
            lock.close()


def _env(cluster) -> dict:
    env = dict(
        os.environ,
        SLURM_CONF=str(cluster / "etc" / "slurm.conf"),
        LATENTPIPE_PYTHON=sys.executable,
        LATENTPIPE_SLURM_DIR=str(REPO / "slurm"),
        LATENTPIPE_REQUEUE_START_NOW="1",
        OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        PYTHONPATH=str(REPO),
    )
    for key in [k for k in env if k.startswith(("PYTEST_", "SLURM_JOB", "SLURM_ARRAY"))] + ["NODE_RANK", "RANK"]:
        env.pop(key, None)
    return env


def _run(argv, cluster, cwd, timeout=120):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(cluster), cwd=cwd)
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _wait(job_ids, deadline_s, run_dir=None, until=TERMINAL) -> dict[str, list[dict]]:
    """Poll until every job (every array task) is in a state of `until`; fail with the logs at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        states = {j: slurm.job_states(j) for j in job_ids}
        if all(tasks and all(t.get("JobState") in until for t in tasks) for tasks in states.values()):
            return states
        if time.monotonic() > end:
            pytest.fail(
                f"jobs not {sorted(until)} after {deadline_s} s: "
                f"{ {j: [(t.get('JobId'), t.get('JobState'), t.get('Reason')) for t in s] for j, s in states.items()} }"
                f"\n{_job_logs(run_dir)}\n{_logs()}"
            )
        time.sleep(0.5)


def _job_logs(run_dir, tail: int | None = None) -> str:
    """The jobs' logs under run_dir, whole (for assertions) or each file's last `tail` characters."""
    if run_dir is None:
        return ""
    return "\n".join(
        f"== {p}\n{p.read_text()[-tail if tail else 0 :]}" for p in sorted(Path(run_dir).glob("**/slurm/*.out"))
    )


def _submit(cluster, cwd, runs, options=(), overrides=()) -> dict[str, list[str]]:
    out = _run(
        ["latentpipe", "submit", *SBATCH, *options, f"experiment.runs_dir={runs}", *ARGS, *overrides], cluster, cwd
    )
    ids: dict[str, list[str]] = {}
    for line in out.splitlines():
        stage, _, job = line.partition(": ")
        ids.setdefault(stage, []).append(job.strip())
    return ids


def _stamp(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


@pytest.fixture(scope="module")
def chain(cluster, tmp_path_factory):
    """The tiny pipeline submitted with `latentpipe submit`, sample as an array of 3 tasks."""
    root = tmp_path_factory.mktemp("chain")
    ids = _submit(cluster, root, root / "runs", ["--sample-tasks", "3"])
    states = _wait([j for js in ids.values() for j in js], 420, root / "runs")
    return root / "runs" / "tiny", ids, states


def test_chain_completes_with_array_sampling(chain, cluster):
    run, ids, states = chain
    assert list(ids) == ["prepare", "autoencoder", "encode", "diffusion", "sample (array)", "sample", "evaluate"]
    bad = {
        j: [(t["JobId"], t["JobState"], t.get("ExitCode")) for t in s]
        for j, s in states.items()
        if any(t["JobState"] != "COMPLETED" for t in s)
    }
    assert not bad, f"{bad}\n{_job_logs(run.parent)}"
    for stage in ("prepare", "autoencoder", "encode", "diffusion", "sample", "evaluate"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "complete", stage
    with np.load(run / "sample" / "samples.npz") as samples:
        assert len(samples[samples.files[0]]) == 12
    recorded = json.loads((run / "slurm" / "jobs.json").read_text())
    assert [j["job_id"] for j in recorded["jobs"]] == [j for js in ids.values() for j in js]

    # the array tasks wrote every chunk (before the plain sample job started), each task its own
    tasks = states[ids["sample (array)"][0]]
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1, 2]
    (chunk_dir,) = (run / "sample" / "chunks").iterdir()
    chunks = sorted(chunk_dir.glob("chunk-*.npz"))
    assert [c.name for c in chunks] == [f"chunk-{c:06d}.npz" for c in range(3)]
    plain_start = _stamp(states[ids["sample"][0]][0]["StartTime"])
    by_task = {int(t["ArrayTaskId"]): t for t in tasks}
    for number, chunk in enumerate(chunks):
        mtime = chunk.stat().st_mtime
        assert mtime <= plain_start + 1, f"{chunk.name} written by the plain sample job, not the array"
        task = by_task[number % 3]  # chunk c belongs to task c mod 3
        assert _stamp(task["StartTime"]) - 1 <= mtime <= _stamp(task["EndTime"]) + 1, (chunk.name, task)
    with np.load(run / "sample" / "samples.npz") as samples:
        joined = np.concatenate([np.load(c)[np.load(c).files[0]] for c in chunks])
        np.testing.assert_array_equal(samples[samples.files[0]], joined)

    status = _run(["latentpipe", "status", f"experiment.runs_dir={run.parent}", *ARGS], cluster, run.parent)
    assert status.count("COMPLETED") >= 7 and "3 COMPLETED" in status, status
    # resubmitting finds every stage up to date and submits nothing
    again = subprocess.run(
        ["latentpipe", "submit", *SBATCH, f"experiment.runs_dir={run.parent}", *ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(cluster),
        cwd=run.parent,
    )
    assert again.returncode == 0 and again.stdout.strip() == "", again.stdout + again.stderr


def test_job_logs_show_progress_and_no_deprecation_warnings(chain):
    """A job's output is a file, not a terminal: the training stages log progress lines (the last
    step always), evaluate logs where its report is, and no third-party deprecation notice shows."""
    run, _, _ = chain
    log = _job_logs(run.parent)
    assert "autoencoder: step 5/5, loss" in log and "diffusion: step 8/8, loss" in log, log
    assert "ETA" in log and "evaluate: report in" in log, log
    assert "FutureWarning" not in log and "DeprecationWarning" not in log, log
    assert "Setting accelerator to CPU" not in log, log  # DeepSpeed's notice in every stage, unless told


def test_failing_stage_cancels_its_dependents(cluster, tmp_path):
    # a path that does not exist passes the config check but fails when prepare reads it
    ids = _submit(
        cluster,
        tmp_path,
        tmp_path / "runs",
        ["--stages", "prepare,autoencoder,encode"],
        ["data.source=folder", f"data.path={tmp_path / 'no-such-images'}"],
    )
    states = _wait([js[0] for js in ids.values()], 120, tmp_path)
    prepare, autoencoder, encode = (states[ids[s][0]][0] for s in ("prepare", "autoencoder", "encode"))
    assert prepare["JobState"] == "FAILED" and prepare["ExitCode"] != "0:0", prepare
    assert autoencoder["JobState"] == "CANCELLED" and encode["JobState"] == "CANCELLED", (autoencoder, encode)
    assert not (tmp_path / "runs" / "tiny" / "autoencoder").exists()
    assert "requeue" not in _job_logs(tmp_path)  # a real failure is not requeued
    assert int(prepare.get("Restarts", "0")) == 0


def _copy_upstream(chain_run: Path, root: Path) -> Path:
    for stage in ("prepare", "autoencoder", "encode"):
        shutil.copytree(chain_run / stage, root / "runs" / "tiny" / stage)
    return root / "runs"


def _preempt(cluster, job, checkpoints: Path, log_dir: Path) -> dict:
    """Send the batch script USR1 once the first checkpoint exists (mid-training, as SLURM's
    --signal=B:USR1@N would), then wait until the requeued job has finished; returns its state."""
    end = time.monotonic() + 180
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*/complete.json"))):
        assert time.monotonic() < end, f"no checkpoint after 180 s\n{_job_logs(log_dir)}"
        assert slurm.job_states(job)[0]["JobState"] in ("PENDING", "RUNNING"), (
            f"{slurm.job_states(job)}\n{_job_logs(log_dir)}"
        )
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30, env=_env(cluster))
    end, held_since = time.monotonic() + 240, None
    while True:
        (state,) = slurm.job_states(job)
        if state["JobState"] in TERMINAL and (int(state.get("Restarts", "0")) >= 1 or state["JobState"] != "COMPLETED"):
            return state
        if state["JobState"] == "PENDING" and state.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since > 15:  # common.sh's LATENTPIPE_REQUEUE_START_NOW did not lift the hold
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], timeout=30, env=_env(cluster))
                held_since = None
        assert time.monotonic() < end, f"{state}\n{_job_logs(log_dir)}"
        time.sleep(0.5)


# Enough steps that a 3 s time budget cannot hold them on an idle machine (80 once finished in one
# job: the time-budget test then saw no requeue)
MAX_STEPS = 400
STEPS = [f"diffusion.max_steps={MAX_STEPS}", "diffusion.checkpoint_every=50", "diffusion.log_every=50"]


@pytest.fixture(scope="module")
def reference(chain, cluster, tmp_path_factory) -> dict:
    """The denoiser of an uninterrupted run of STEPS, outside SLURM."""
    root = tmp_path_factory.mktemp("reference")
    runs = _copy_upstream(chain[0], root)
    _run(
        [sys.executable, "-m", "pipeline.cli", "-q", "diffusion", f"experiment.runs_dir={runs}", *ARGS, *STEPS],
        cluster,
        root,
        timeout=300,
    )
    return load_file(runs / "tiny" / "diffusion" / "denoiser.safetensors")


def _assert_weights(expected: dict, runs: Path) -> None:
    got = load_file(runs / "tiny" / "diffusion" / "denoiser.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def _sbatch_diffusion(cluster, root: Path, runs: Path, *overrides: str) -> str:
    (root / "slurm").mkdir(exist_ok=True)  # sbatch does not create the log directory
    out = _run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={root}/slurm/%x-%j.out",
            str(REPO / "slurm" / "diffusion.sbatch"),
            f"experiment.runs_dir={runs}",
            *ARGS,
            *overrides,
        ],
        cluster,
        root,
    )
    return out.strip().split(";")[0]


def test_a_time_budget_requeues_the_job_until_it_ends_with_the_uninterrupted_weights(
    chain, cluster, reference, tmp_path
):
    runs = _copy_upstream(chain[0], tmp_path)
    # 3 s of training per run, DataLoader workers on: requeued (no signal) until the 400 steps are done
    job = _sbatch_diffusion(
        cluster, tmp_path, runs, *STEPS, "diffusion.time_budget_minutes=0.05", "diffusion.num_workers=1"
    )
    end, held_since = time.monotonic() + 600, None
    while True:
        (state,) = slurm.job_states(job)
        if state["JobState"] in TERMINAL:
            break
        if state["JobState"] == "PENDING" and state.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since > 15:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], timeout=30, env=_env(cluster))
                held_since = None
        assert time.monotonic() < end, f"{state}\n{_job_logs(tmp_path)}"
        time.sleep(0.5)
    log = _job_logs(tmp_path)
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) >= 1, f"{state}\n{log}"
    assert "stopped cleanly (time budget); requeueing job" in log, log
    assert json.loads((runs / "tiny" / "diffusion" / "manifest.json").read_text())["status"] == "complete"
    _assert_weights(reference, runs)


def test_scancel_signal_term_checkpoints_is_not_requeued_and_a_resubmission_ends_like_an_uninterrupted_run(
    chain, cluster, reference, tmp_path
):
    runs = _copy_upstream(chain[0], tmp_path)
    job = _sbatch_diffusion(cluster, tmp_path, runs, *STEPS, "diffusion.num_workers=1")
    checkpoints = runs / "tiny" / "diffusion" / "checkpoints"
    end = time.monotonic() + 180
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*/complete.json"))):
        assert time.monotonic() < end, f"no checkpoint after 180 s\n{_job_logs(tmp_path)}"
        assert slurm.job_states(job)[0]["JobState"] in ("PENDING", "RUNNING"), _job_logs(tmp_path)
        time.sleep(0.1)
    # --full: TERM to every process of the batch step (script, stage, DataLoader worker) at once
    subprocess.run(["scancel", "--signal=TERM", "--full", job], check=True, timeout=30, env=_env(cluster))
    (state,) = _wait([job], 120, tmp_path)[job]
    time.sleep(3)  # a requeue would show up as PENDING with a restart by now
    (state,) = slurm.job_states(job)
    log = _job_logs(tmp_path)
    assert state["Restarts"] == "0" and state["JobState"] in TERMINAL, f"{state}\n{log}"
    assert "stopped cleanly on SIGTERM; not requeued" in log and "killed by signal" not in log, log
    found = json.loads((runs / "tiny" / "diffusion" / "manifest.json").read_text())
    assert found["status"] == "interrupted" and "SIGTERM" in found["error"], found

    again = _sbatch_diffusion(cluster, tmp_path, runs, *STEPS, "diffusion.num_workers=1")
    (state,) = _wait([again], 300, tmp_path)[again]
    assert state["JobState"] == "COMPLETED", f"{state}\n{_job_logs(tmp_path)}"
    _assert_weights(reference, runs)


def test_preempted_diffusion_is_requeued_and_resumes_exactly(chain, cluster, reference, tmp_path):
    runs = _copy_upstream(chain[0], tmp_path / "preempted")
    (tmp_path / "preempted" / "slurm").mkdir()  # sbatch does not create the log directory
    out = _run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={tmp_path}/preempted/slurm/%x-%j.out",
            str(REPO / "slurm" / "diffusion.sbatch"),
            f"experiment.runs_dir={runs}",
            *ARGS,
            *STEPS,
        ],
        cluster,
        tmp_path / "preempted",
    )
    job = out.strip().split(";")[0]
    checkpoints = runs / "tiny" / "diffusion" / "checkpoints"
    state = _preempt(cluster, job, checkpoints, tmp_path)
    log = _job_logs(tmp_path)
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) == 1, f"{state}\n{log}"
    assert "received SIGUSR1" in log and "requeueing job" in log and "restart count 1" in log, log
    found = json.loads((runs / "tiny" / "diffusion" / "manifest.json").read_text())
    assert found["status"] == "complete" and found["metrics"]["steps"] == MAX_STEPS
    interrupted_at = [int(p.name.split("-")[1]) for p in checkpoints.glob("step-*")]
    assert interrupted_at and min(interrupted_at) < MAX_STEPS, interrupted_at
    _assert_weights(reference, runs)


def test_two_nodes_rendezvous_train_and_survive_preemption(chain, cluster, tmp_path):
    runs = _copy_upstream(chain[0], tmp_path)
    (tmp_path / "slurm").mkdir()
    steps = ["diffusion.max_steps=30", "diffusion.checkpoint_every=10", "diffusion.log_every=10"]
    out = _run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={tmp_path}/slurm/%x-%j.out",
            str(REPO / "slurm" / "diffusion.sbatch"),
            f"experiment.runs_dir={runs}",
            *ARGS,
            *steps,
        ],
        cluster,
        tmp_path,
    )
    job = out.strip().split(";")[0]
    state = _preempt(cluster, job, runs / "tiny" / "diffusion" / "checkpoints", tmp_path)
    log = _job_logs(tmp_path)
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) == 1, f"{state}\n{log}"
    assert state["NodeList"] == "n[1-2]", state
    assert "world 2, rendezvous n1:" in log
    assert "node n1 (node rank 0 of 2)" in log and "node n2 (node rank 1 of 2)" in log, log
    # torchrun exits 1 on a worker's 75: the manifest's 'interrupted' status made it a requeue
    assert "manifest status 'interrupted'" in log and "requeueing job" in log and "restart count 1" in log, log
    final = runs / "tiny" / "diffusion" / "checkpoints" / "step-00000030"
    assert json.loads((final / "complete.json").read_text())["world_size"] == 2
    # both ranks reached the same step: the shared state holds each one's loader position (epoch, batch in epoch)
    loaders = torch.load(final / "state.pt", weights_only=True)["loaders"]
    assert [(x["epoch"], x["batches"], x["samples_seen"]) for x in loaders] == [
        (loaders[0]["epoch"], loaders[0]["batches"], loaders[0]["samples_seen"])
    ] * 2, loaders
    assert loaders[0]["layout"]["world_size"] == 2
    assert json.loads((runs / "tiny" / "diffusion" / "manifest.json").read_text())["metrics"]["steps"] == 30
    assert (runs / "tiny" / "diffusion" / "denoiser.safetensors").is_file()


def test_scancel_is_not_undone_by_a_requeue(chain, cluster, tmp_path):
    runs = _copy_upstream(chain[0], tmp_path)
    (tmp_path / "slurm").mkdir()
    out = _run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={tmp_path}/slurm/%x-%j.out",
            str(REPO / "slurm" / "diffusion.sbatch"),
            f"experiment.runs_dir={runs}",
            *ARGS,
            "diffusion.max_steps=100000",
            "diffusion.checkpoint_every=10",
        ],
        cluster,
        tmp_path,
    )
    job = out.strip().split(";")[0]
    checkpoints = runs / "tiny" / "diffusion" / "checkpoints"
    end = time.monotonic() + 180
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*/complete.json"))):
        assert time.monotonic() < end, f"no checkpoint after 180 s\n{_job_logs(tmp_path)}"
        time.sleep(0.1)
    subprocess.run(["scancel", job], check=True, timeout=30, env=_env(cluster))
    (state,) = _wait([job], 120, tmp_path)[job]
    time.sleep(3)  # a requeue would show up as PENDING with a restart by now
    (state,) = slurm.job_states(job)
    log = _job_logs(tmp_path)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", f"{state}\n{log}"
    assert "not requeued" in log, log
    assert json.loads((runs / "tiny" / "diffusion" / "manifest.json").read_text())["status"] == "interrupted"


def test_a_requeued_job_continues_on_another_number_of_nodes(chain, cluster, tmp_path):
    """Preempted on two nodes (world 2), requeued, given one node while it waits: the rerun
    resumes the two-rank checkpoint on one rank and finishes (elastic resume)."""
    runs = _copy_upstream(chain[0], tmp_path)
    (tmp_path / "slurm").mkdir()
    steps = ["diffusion.max_steps=30", "diffusion.checkpoint_every=10", "diffusion.log_every=10"]
    env = dict(_env(cluster), LATENTPIPE_REQUEUE_START_NOW="0")  # keep SLURM's requeue hold: time to resize
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={tmp_path}/slurm/%x-%j.out",
            str(REPO / "slurm" / "diffusion.sbatch"),
            f"experiment.runs_dir={runs}",
            *ARGS,
            *steps,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    job = out.strip().split(";")[0]
    checkpoints = runs / "tiny" / "diffusion" / "checkpoints"
    end = time.monotonic() + 180
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*/complete.json"))):
        assert time.monotonic() < end, f"no checkpoint after 180 s\n{_job_logs(tmp_path)}"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30, env=_env(cluster))
    end = time.monotonic() + 180
    while (state := slurm.job_states(job)[0])["JobState"] != "PENDING" or int(state.get("Restarts", "0")) < 1:
        assert time.monotonic() < end and state["JobState"] not in TERMINAL, f"{state}\n{_job_logs(tmp_path)}"
        time.sleep(0.2)
    subprocess.run(
        ["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1"], check=True, timeout=30, env=_env(cluster)
    )
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], check=True, timeout=30, env=_env(cluster))
    (state,) = _wait([job], 300, tmp_path)[job]
    log = _job_logs(tmp_path)
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) == 1, f"{state}\n{log}"
    assert "world 2, rendezvous" in log and "written by 2 rank(s); this job has 1" in log, log
    found = json.loads((runs / "tiny" / "diffusion" / "manifest.json").read_text())
    assert found["status"] == "complete" and found["metrics"]["steps"] == 30
    final = json.loads((checkpoints / "step-00000030" / "complete.json").read_text())
    assert final["world_size"] == 1
