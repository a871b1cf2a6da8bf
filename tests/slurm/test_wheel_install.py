"""`latentpipe submit` from a wheel install, outside any checkout: the sbatch scripts are package
data (pipeline/sbatch/), not files next to a source tree."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("pyproject.toml", "README.md", "pipeline", "stages")
"""What the wheel is built from (a copy, so the build leaves nothing in the checkout)."""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with latentpipe installed (non-editable) from a wheel; the test dependencies
    come from the running interpreter's site-packages, listed in a .pth file."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SHIPPED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    wheel = next((tmp / "dist").glob("latentpipe-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (packages / "outer-site-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LATENTPIPE_SLURM_DIR", "VIRTUAL_ENV")}


@pytest.mark.slow
def test_submit_dry_run_from_a_wheel_install_outside_the_checkout(installed, tmp_path):
    python = installed / "bin" / "python"
    where = subprocess.run(
        [python, "-c", "import pipeline, stages; print(pipeline.__file__); print(stages.__file__)"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where), where  # the wheel's copy, not the checkout
    done = subprocess.run(
        [
            installed / "bin" / "latentpipe",
            "submit",
            "--dry-run",
            "--sample-tasks",
            "2",
            f"experiment.runs_dir={tmp_path / 'runs'}",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    scripts_dir = Path(next(line for line in lines if line.startswith("export LATENTPIPE_SLURM_DIR=")).split("=", 1)[1])
    assert scripts_dir.is_relative_to(installed) and (scripts_dir / "common.sh").is_file()
    jobs = [line for line in lines if line.startswith("job")]
    assert len(jobs) == 7  # six stages, sample as array + assembly
    for line in jobs:
        script = next(Path(token) for token in line.split() if token.endswith(".sbatch"))
        assert script.parent == scripts_dir and script.is_file()
    subprocess.run(["bash", "-n", scripts_dir / "common.sh"], check=True)
    subprocess.run(["bash", "-n"], input=done.stdout, text=True, check=True)
    asked = subprocess.run(
        [python, "-m", "pipeline.stage_registry", "checkpoints", "diffusion"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert asked.stdout.strip() == "yes"  # what common.sh asks at job start works from the wheel too
