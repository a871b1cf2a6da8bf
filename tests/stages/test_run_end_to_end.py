"""`latentpipe run`: every stage on a tiny real run, a summary, and a rerun that skips them all."""

from pipeline import cli, config, manifest
from tests.stages.test_diffusion_stage import ARGS

FAST = (
    "sample.num_samples=40",
    "sample.chunk_size=20",
    "sample.steps=6",
    "evaluate.classifier_steps=40",
    "evaluate.likelihood_count=4",
    "evaluate.likelihood_rtol=1e-3",
    "evaluate.kid_subsets=5",
)
STAGES = ("prepare", "autoencoder", "encode", "diffusion", "sample", "evaluate")


def test_latentpipe_run_end_to_end_then_skips_everything(tmp_path, weights_cache, monkeypatch, capsys):
    cache = tmp_path / "cache"  # the real weights, none of the user's cached statistics
    cache.mkdir()
    for entry in weights_cache.iterdir():
        if entry.is_file():
            (cache / entry.name).symlink_to(entry)
    monkeypatch.setenv("LATENTPIPE_CACHE", str(cache))
    overrides = [f"experiment.runs_dir={tmp_path / 'runs'}", *ARGS, *FAST]
    assert cli.main(["-q", "run", *overrides]) == 0
    first = capsys.readouterr().out
    for line in ("sample grid:", "report:", "FID (samples vs val)", "classifier accuracy on samples", "bits/dim"):
        assert line in first, first
    cfg = config.load(overrides=overrides)
    assert all(manifest.read(cfg.stage_dir(stage))["status"] == "complete" for stage in STAGES)
    assert cli.main(["-q", "run", *overrides]) == 0
    assert capsys.readouterr().out.count("skipped (up to date)") == len(STAGES)
