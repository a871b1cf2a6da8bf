"""tools/gpu_acceptance.py runs end to end on the CPU (--smoke), so it cannot rot between the
rare runs on a GPU: every section yields its figures, and the JSON and Markdown agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_run_on_cpu_fills_every_section(tmp_path, weights_cache):
    cache = tmp_path / "cache"  # the real weights, none of the user's cached statistics
    cache.mkdir()
    for entry in weights_cache.iterdir():
        if entry.is_file():
            (cache / entry.name).symlink_to(entry)
    env = {**os.environ, "LATENTPIPE_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gpu_acceptance.py"),
            "--device",
            "cpu",
            "--smoke",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_acceptance.json").read_text())
    assert report["environment"]["smoke"] and "--smoke" in report["environment"]["command"]
    sections = report["sections"]
    assert [key.split()[0] for key in sections] == list("abcdef")
    assert all(s["error"] is None and s["rows"] for s in sections.values()), sections
    assert sections["a pipeline"]["rows"][0]["fid"] > 0
    assert {row["config"].split()[2] for row in sections["b dit"]["rows"]} >= {"sdpa", "math"}
    assert all(row["images_per_s"] > 0 for key in ("b dit", "c unet", "f encode") for row in sections[key]["rows"])
    zero = sections["d distributed"]["rows"][0]
    assert zero["zero_stage"] == 2 and zero["all_reduce_ok"] and zero["parameters_moved"]
    table = (tmp_path / "out" / "gpu_acceptance.md").read_text()
    assert table.count("\n| ") == 1 + sum(len(s["rows"]) for s in sections.values())  # header + one row per figure
    assert "error" not in table


def test_a_missing_gpu_is_refused_with_the_cpu_alternative(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_acceptance.py"), "--out", str(tmp_path)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and "--device cpu --smoke" in done.stderr
    assert not any(tmp_path.iterdir())
