"""Typed stage artifacts: each one survives to_manifest -> manifest.json -> from_stage_dir unchanged,
writes the manifest keys the stages always wrote, and is refused (naming the command that
fixes it) when missing, unfinished, made with another config, made from another upstream, or
when a recorded file changed."""

import dataclasses
import io
import json

import numpy as np
import pytest

from pipeline import artifacts, config, manifest, stage_registry
from pipeline.artifacts import OutputFile
from pipeline.manifest import StageInputError

SHA = "ab" * 32


def _cfg(tmp_path, *overrides):
    return config.load(overrides=[f"experiment.runs_dir={tmp_path}", *overrides])


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1), labels=np.array([0, 1]))
    return buffer.getvalue()


ARTIFACTS = {  # stage -> (the artifact as its stage publishes it, its files: name -> (bytes, output extras))
    "prepare": (
        artifacts.PreparedShards(
            directory=None,
            splits={
                "train": artifacts.SplitSummary(3, ("train-000000.tar", "train-000001.tar"), {"0": 2, "1": 1}),
                "val": artifacts.SplitSummary(1, ("val-000000.tar",), {"0": 1}),
            },
            classes=("0", "1"),
            skipped=({"position": 4, "key": "k4", "source": "x.png", "error": "OSError: bad"},),
            image=artifacts.ImageSpec(resolution=16, channels=1, format="png"),
        ),
        {
            "train-000000.tar": (b"t0" * 8, {"split": "train", "count": 2}),
            "train-000001.tar": (b"t1" * 4, {"split": "train", "count": 1}),
            "val-000000.tar": (b"v0" * 4, {"split": "val", "count": 1}),
        },
    ),
    "autoencoder": (
        artifacts.TrainedAutoencoder(
            directory=None,
            latent=artifacts.LatentShape(channels=4, resolution=4, kind="vq"),
            image=artifacts.ImageShape(channels=1, resolution=16),
        ),
        {"autoencoder.safetensors": (b"weights", {})},
    ),
    "encode": (
        artifacts.EncodedLatents(
            directory=None,
            latent=artifacts.LatentStats(
                channels=4,
                resolution=4,
                kind="vq",
                fields=("codes", "codes_flip"),
                channel_mean=(0.1, -0.2, 0.3, 0.0),
                channel_std=(1.0, 0.5, 2.0, 1.5),
                scale=0.75,
                autoencoder_sha256=SHA,
            ),
        ),
        {
            "codebook.safetensors": (b"table", {}),
            "latents/train-000000.tar": (b"l0", {"split": "train", "count": 2}),
            "latents/val-000000.tar": (b"l1", {"split": "val", "count": 1}),
        },
    ),
    "diffusion": (
        artifacts.TrainedDenoiser(
            directory=None,
            denoiser=artifacts.DenoiserInfo(
                backbone="dit",
                network={"depth": 2, "patch_size": 1, "mlp": [1, 2]},
                num_classes=2,
                latent_shape=(4, 4, 4),
                process="ddpm",
                prediction="v",
                sigma_range=(0.002, 80.0),
                training_flops_per_sample=12345,
            ),
        ),
        {"denoiser.safetensors": (b"ema weights", {})},
    ),
    "sample": (
        artifacts.Samples(
            directory=None,
            samples=artifacts.SamplerInfo(
                count=2, method="ddpm", steps=6, grid="process", guidance_scale=2.0, snap=True, nfe=12.0, labels="all"
            ),
        ),
        {"samples.npz": (_npz(), {"count": 2}), "grid.png": (b"png", {})},
    ),
    "evaluate": (artifacts.Evaluation(directory=None), {"metrics.json": (b"{}", {}), "report.md": (b"# report", {})}),
}

LEGACY_KEYS = {  # the manifest keys (and nested keys) the stages wrote before artifacts were typed
    "prepare": {
        "splits": {"train": ["count", "shards", "class_counts"]},
        "classes": None,
        "skipped": None,
        "image": ["resolution", "channels", "format"],
    },
    "autoencoder": {"latent": ["channels", "resolution", "kind"], "image": ["channels", "resolution"]},
    "encode": {
        "latent": [
            "channels",
            "resolution",
            "kind",
            "fields",
            "channel_mean",
            "channel_std",
            "scale",
            "autoencoder_sha256",
        ]
    },
    "diffusion": {
        "denoiser": [
            "backbone",
            "network",
            "num_classes",
            "latent_shape",
            "process",
            "prediction",
            "sigma_range",
            "training_flops_per_sample",
        ]
    },
    "sample": {"samples": ["count", "method", "steps", "grid", "guidance_scale", "snap", "nfe", "labels"]},
    "evaluate": {},
}


def _publish(cfg, stage: str):
    """Run ``stage`` as its stage would (stage_run, files, metrics, publish); the artifact expected back."""
    spec = stage_registry.get(stage)
    artifact, files = ARTIFACTS[stage]
    with manifest.stage_run(cfg, stage, spec.sections, spec.inputs) as record:
        for name, (data, extra) in files.items():
            (record.directory / name).parent.mkdir(parents=True, exist_ok=True)
            (record.directory / name).write_bytes(data)
            record.add_output(record.directory / name, **extra)
        record.metrics.update(score=0.5)
        record.publish(artifact)
    return dataclasses.replace(
        artifact,
        directory=cfg.stage_dir(stage),
        metrics={"score": 0.5},
        outputs=tuple(OutputFile.from_manifest(o) for o in record.outputs),
    )


def _publish_up_to(cfg, last: str) -> dict:
    expected = {}
    for spec in stage_registry.PIPELINE:
        expected[spec.name] = _publish(cfg, spec.name)
        if spec.name == last:
            return expected
    raise AssertionError(last)


def test_every_registered_stage_has_an_artifact():
    assert list(artifacts.ARTIFACTS) == list(stage_registry.STAGES) == list(ARTIFACTS)


@pytest.mark.parametrize("stage", list(ARTIFACTS))
def test_round_trip_through_the_manifest(tmp_path, stage):
    cfg = _cfg(tmp_path)
    expected = _publish_up_to(cfg, stage)[stage]
    loaded = artifacts.ARTIFACTS[stage].from_stage_dir(cfg)
    assert loaded == expected
    assert loaded.to_manifest() == ARTIFACTS[stage][0].to_manifest()


@pytest.mark.parametrize("stage", list(ARTIFACTS))
def test_the_manifest_keeps_its_keys(tmp_path, stage):
    cfg = _cfg(tmp_path)
    _publish_up_to(cfg, stage)
    found = json.loads((cfg.stage_dir(stage) / manifest.MANIFEST).read_text())
    for key, nested in LEGACY_KEYS[stage].items():
        value = found[key]
        if key == "splits":
            value, nested = value["train"], nested["train"]
        if nested is not None:
            assert list(value) == nested, key
    assert all(isinstance(o["bytes"], int) and "path" in o for o in found["outputs"])


def test_files_come_from_the_manifest_in_its_order(tmp_path):
    cfg = _cfg(tmp_path)
    _publish_up_to(cfg, "encode")
    (cfg.stage_dir("prepare") / "train-000009.tar").write_bytes(b"stray")  # on disk, never recorded
    prepared = artifacts.PreparedShards.from_stage_dir(cfg)
    assert [p.name for p in prepared.files("train")] == ["train-000000.tar", "train-000001.tar"]
    assert prepared.count("train") == 3 and prepared.shard_hashes("val") == [
        manifest.sha256_file(cfg.stage_dir("prepare") / "val-000000.tar")
    ]
    encoded = artifacts.EncodedLatents.from_stage_dir(cfg)
    assert encoded.files("val") == [cfg.stage_dir("encode") / "latents" / "val-000000.tar"]
    assert encoded.latent.has_mirrors


def test_a_missing_stage_is_refused_naming_the_command(tmp_path):
    with pytest.raises(StageInputError, match="run `latentpipe prepare` first"):
        artifacts.PreparedShards.from_stage_dir(_cfg(tmp_path))


def test_an_unfinished_stage_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _publish_up_to(cfg, "autoencoder")
    found = manifest.read(cfg.stage_dir("autoencoder"))
    manifest.write(cfg.stage_dir("autoencoder"), {**found, "status": manifest.INTERRUPTED})
    with pytest.raises(StageInputError, match="is 'interrupted', not complete: rerun `latentpipe autoencoder`"):
        artifacts.TrainedAutoencoder.from_stage_dir(cfg)


def test_an_output_of_another_config_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _publish_up_to(cfg, "diffusion")
    other = _cfg(tmp_path, "diffusion.prediction=eps")
    with pytest.raises(StageInputError, match="made with another config .* rerun `latentpipe diffusion`"):
        artifacts.TrainedDenoiser.from_stage_dir(other)
    artifacts.EncodedLatents.from_stage_dir(other)  # the other stages' sections did not change


def test_an_output_made_from_a_foreign_upstream_is_refused_naming_both_hashes(tmp_path):
    cfg = _cfg(tmp_path)
    _publish_up_to(cfg, "encode")
    recorded = manifest.manifest_hash(cfg.stage_dir("autoencoder"))
    _publish(cfg, "autoencoder")  # a new autoencoder: the latents are stale
    current = manifest.manifest_hash(cfg.stage_dir("autoencoder"))
    with pytest.raises(StageInputError, match="stage 'encode' was made from a different 'autoencoder'") as err:
        artifacts.EncodedLatents.from_stage_dir(cfg)
    assert recorded[:12] in str(err.value) and current[:12] in str(err.value)
    assert "rerun `latentpipe encode`" in str(err.value)
    artifacts.TrainedAutoencoder.from_stage_dir(cfg)  # the new autoencoder itself is fine


def test_a_removed_upstream_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _publish_up_to(cfg, "autoencoder")
    (cfg.stage_dir("prepare") / manifest.MANIFEST).unlink()
    with pytest.raises(StageInputError, match="different 'prepare' .*current missing"):
        artifacts.TrainedAutoencoder.from_stage_dir(cfg)


def test_a_changed_or_missing_file_is_refused_naming_the_stage(tmp_path):
    cfg = _cfg(tmp_path)
    _publish_up_to(cfg, "sample")
    samples = artifacts.Samples.from_stage_dir(cfg)
    images, labels = samples.arrays()
    assert images.shape == (2, 4, 4, 1) and labels.tolist() == [0, 1]
    trained = artifacts.TrainedDenoiser.from_stage_dir(cfg)
    path = trained.verified("denoiser.safetensors")
    path.write_bytes(b"EMA weights")  # same size, other content
    with pytest.raises(StageInputError, match="sha256 differs.*rerun `latentpipe diffusion`"):
        trained.verified("denoiser.safetensors")
    path.write_bytes(b"longer weights")
    with pytest.raises(StageInputError, match="size 14, recorded 11"):
        trained.verified("denoiser.safetensors")
    path.unlink()
    with pytest.raises(StageInputError, match="denoiser.safetensors is missing .*rerun `latentpipe diffusion`"):
        trained.verified("denoiser.safetensors")
    with pytest.raises(StageInputError, match="recorded no output 'nope.bin'"):
        trained.verified("nope.bin")
