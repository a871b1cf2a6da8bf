"""tools/bench_quality.py: settings parse and print back, every family runs on one denoiser from
one x_T with its NFE counted (Heun 2n - 1, dpm_adaptive its own), ours == k-diffusion where both
run the same method on the same grid, and the frontier summary compares within each budget.
The end-to-end run on a tiny trained model is the slow test at the bottom."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.diffusion import DDPM, GaussianMixture
from tests.stages.test_diffusion_stage import ARGS
from tests.stages.test_sample_stage import trained  # noqa: F401 (fixture)
from tools.bench_quality import Setting, frontier, run_sampler, summary

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


def test_settings_parse_and_print_back():
    for text in (
        "ipndm:karras:20",
        "unipc:logsnr:10:order=3",
        "k-diffusion/dpm_adaptive:karras:2:rtol=0.05",
        "diffusers/UniPCMultistep:own:5:solver_order=3,use_karras_sigmas=True",
    ):
        assert str(Setting.parse(text)) == text
    s = Setting.parse("diffusers/DEISMultistep:own:5:use_karras_sigmas=true,solver_order=3")
    assert s.options == (("use_karras_sigmas", True), ("solver_order", 3)) and s.family == "diffusers"
    for bad in (
        "ipndm:karras",
        "torchsde/euler:karras:5",
        "diffusers/DDIM:karras:5",
        "k-diffusion/euler:own:5",
        "euler:k:5:x",
    ):
        with pytest.raises(ValueError):
            Setting.parse(bad)


def test_frontier_fits_each_budget():
    settings = frontier([5, 20])
    heun = [s.steps for s in settings if s.method == "heun"]
    assert heun == [3, 3, 10, 10]  # ours and k-diffusion's: 2n - 1 <= budget
    assert {s.steps for s in settings if s.method == "ipndm"} == {5, 20}
    assert {s.family for s in settings} == {"ours", "k-diffusion", "diffusers"}
    assert sum(s.method == "dpm_adaptive" for s in settings) == 2  # once, not per budget


@pytest.fixture(scope="module")
def oracle():
    gmm = GaussianMixture.random(dim=2, components=3, generator=torch.Generator().manual_seed(0)).to(torch.float32)
    process = DDPM.linear(1000)
    noise = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(100 + i)) for i in range(16)])
    return gmm, process, noise


def _generators():
    return [torch.Generator().manual_seed(i) for i in range(16)]


def test_every_family_runs_with_its_calls_counted(oracle):
    gmm, process, noise = oracle
    expected = {
        "ipndm:karras:6": 6,
        "heun:karras:6": 11,
        "ddim:process:6": 6,
        "k-diffusion/heun:karras:6": 11,
        "k-diffusion/dpmpp_3m_sde:karras:6": 6,
        "diffusers/DDIM:own:6": 6,
        "diffusers/UniPCMultistep:own:6:use_karras_sigmas=true": 6,
    }
    for text, nfe in expected.items():
        out, calls = run_sampler(Setting.parse(text), gmm.denoiser, noise, process, _generators())
        assert calls == nfe and out.shape == noise.shape and bool(out.isfinite().all()), text
    adaptive = Setting.parse("k-diffusion/dpm_adaptive:karras:2:rtol=0.2")
    _, calls = run_sampler(adaptive, gmm.denoiser, noise, process, _generators())
    assert calls > 2


def test_ours_equals_k_diffusion_on_the_same_grid_and_noise(oracle):
    gmm, process, noise = oracle
    for method in ("euler", "dpmpp_2m", "dpmpp_3m_sde"):  # dpmpp_3m_sde: the same per-sample noise draws
        ours, peer = (
            run_sampler(Setting.parse(f"{prefix}{method}:karras:8"), gmm.denoiser, noise, process, _generators())[0]
            for prefix in ("", "k-diffusion/")
        )
        torch.testing.assert_close(ours, peer, rtol=1e-4, atol=1e-4, msg=method)


@pytest.mark.parametrize(
    "ours, peer",
    [("ddim", "DDIM"), ("unipc", "UniPCMultistep"), ("dpmpp_2m", "DPMSolverMultistep")],
)
def test_ours_on_the_own_grid_equals_the_diffusers_scheduler(oracle, ours, peer):
    gmm, process, noise = oracle
    for steps in (5, 10):
        mine, calls = run_sampler(Setting.parse(f"{ours}:own:{steps}"), gmm.denoiser, noise, process, _generators())
        theirs, _ = run_sampler(
            Setting.parse(f"diffusers/{peer}:own:{steps}"), gmm.denoiser, noise, process, _generators()
        )
        assert calls == steps
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4, msg=f"{ours} vs {peer} at {steps} steps")


def test_summary_compares_within_each_budget():
    def row(family, sampler, nfe, fid, accuracy, snap=True):
        return dict(family=family, sampler=sampler, grid="karras", nfe=nfe, fid=fid, accuracy=accuracy, snap=snap)

    rows = [
        row("ours", "ours ipndm", 5, 50.0, 0.9),
        row("ours", "ours ipndm", 10, 40.0, 0.95),
        row("ours", "ours euler", 10, 30.0, 0.99, snap=False),  # unsnapped rows are not compared
        row("k-diffusion", "k-diffusion heun", 9, 45.0, 0.97),
        row("diffusers", "diffusers DDIM", 5, 60.0, 0.96),
    ]
    lines = summary(rows, [5, 10]).splitlines()[2:]
    assert lines[0].startswith("| 5 | ours ipndm (karras, 5 NFE) | 50.00 | 90.0% | diffusers DDIM")
    assert "| yes | 90.0% | 96.0% |" in lines[0]
    assert lines[1].startswith("| 10 | ours ipndm (karras, 10 NFE) | 40.00 | 95.0% | k-diffusion heun (karras, 9 NFE)")
    assert lines[1].endswith("| yes | 95.0% | 97.0% |")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the tool took over 10 min (the default limit) on the overloaded 2-core VM
def test_runs_ours_and_the_peers_on_a_tiny_trained_model(trained, tmp_path, weights_cache):  # noqa: F811
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LATENTPIPE_CACHE": str(weights_cache)}
    overrides = [f"experiment.runs_dir={trained}", *ARGS, "evaluate.classifier_steps=30"]
    settings = ["ipndm:karras:3", "k-diffusion/heun:karras:2", "diffusers/DDIM:own:3"]
    before = sorted(p for p in trained.rglob("*"))
    options = ["--samples", "6", "--settings", *settings, "--snap-off", "--guidance", "1", "2", "--reconstructions"]
    options += ["--json", str(out), "--cache", str(tmp_path)]

    def bench(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench_quality.py"), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    bench(*overrides, *options)
    ceiling, *rows = json.loads(out.read_text())
    assert ceiling["setting"] == "reconstructions" and ceiling["samples"] == 6  # six train images through the AE
    assert ceiling["fid"] > 0 and 0 <= ceiling["accuracy"] <= 1
    assert [(r["setting"], r["guidance"]) for r in rows] == [(s, g) for s in settings for g in (1.0, 2.0)]
    assert [r["nfe"] for r in rows] == [3] * 6
    assert all(r["fid"] > 0 and 0 <= r["accuracy"] <= 1 and 0 <= r["recall"] <= 1 for r in rows)
    assert sorted(p for p in trained.rglob("*")) == before  # the run directory is only read

    # the autoencoder's ceiling alone needs no denoiser: a run that stopped after its autoencoder
    shutil.copytree(trained, tmp_path / "ae-only")
    for stage_dir in (tmp_path / "ae-only").glob("*/*"):
        if stage_dir.name not in ("prepare", "autoencoder"):
            shutil.rmtree(stage_dir)
    overrides[0] = f"experiment.runs_dir={tmp_path / 'ae-only'}"
    only = ["--samples", "4", "--settings", "--reconstructions", "--json", str(out), "--cache", str(tmp_path)]
    bench(*overrides, *only)
    assert [(r["setting"], r["samples"]) for r in json.loads(out.read_text())] == [("reconstructions", 4)]
