"""Fault injection on a finished tiny run (issue 15, "Why" items 1, 4 and 5): every recorded
file is verified when a later stage reads it, and a refused command changes nothing on disk."""

import shutil
from pathlib import Path

import pytest

from pipeline import artifacts, manifest, stage_registry
from pipeline.manifest import StageInputError
from stages import diffusion, encode, sample
from tests.stages.test_diffusion_stage import _cfg, _encoded

SAMPLE_ARGS = (
    "sample.num_samples=4",
    "sample.chunk_size=4",
    "sample.batch_size=4",
    "sample.steps=3",
    "sample.method=ddpm",
    "sample.grid=process",
    "sample.grid_rows=2",
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """prepare .. sample of one tiny run (copied per test: tests damage it)."""
    root = _encoded(tmp_path_factory.mktemp("runs"))
    diffusion.run(_cfg(root))
    sample.run(_cfg(root, *SAMPLE_ARGS))
    return root


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished / "tiny", tmp_path / "tiny")
    return tmp_path


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def _manifest_bytes(root: Path, stage: str) -> bytes:
    return (root / "tiny" / stage / manifest.MANIFEST).read_bytes()


def test_a_deleted_shard_refuses_encode_naming_it_and_leaves_encode_as_it_was(run):
    before = _manifest_bytes(run, "encode"), (run / "tiny" / "encode" / "config.yaml").read_bytes()
    (run / "tiny" / "prepare" / "train-000001.tar").unlink()
    with pytest.raises(StageInputError, match=r"train-000001\.tar is missing .*`latentpipe prepare`"):
        encode.run(_cfg(run))
    assert (_manifest_bytes(run, "encode"), (run / "tiny" / "encode" / "config.yaml").read_bytes()) == before


def test_a_shard_with_one_flipped_bit_is_refused_before_training(run):
    _flip_bit(run / "tiny" / "encode" / "latents" / "train-000000.tar", 700)
    before = _manifest_bytes(run, "diffusion")
    with pytest.raises(
        StageInputError,
        match=r"latents/train-000000\.tar is not the file .*sha256 differs"
        r".*`latentpipe encode`",
    ):
        diffusion.run(_cfg(run))
    assert _manifest_bytes(run, "diffusion") == before


@pytest.mark.parametrize(
    "stage, weights",
    [("autoencoder", artifacts.TrainedAutoencoder.WEIGHTS_FILE), ("diffusion", artifacts.TrainedDenoiser.WEIGHTS_FILE)],
)
def test_a_flipped_bit_in_the_weights_is_refused_when_sampling(run, stage, weights):
    path = run / "tiny" / stage / weights
    _flip_bit(path, path.stat().st_size // 2)
    shutil.rmtree(run / "tiny" / "sample" / "chunks")  # even a run that must render reads verified weights
    before = _manifest_bytes(run, "sample")
    with pytest.raises(
        StageInputError,
        match=rf"{weights} is not the file stage '{stage}' recorded "
        rf"\(sha256 differs\).*`latentpipe {stage}`",
    ):
        sample.run(_cfg(run, *SAMPLE_ARGS))
    assert _manifest_bytes(run, "sample") == before


def test_sample_after_an_autoencoder_config_change_is_refused_and_reuses_nothing(run):
    """Chunks are all there: before the fix they were reused and the stage reported complete."""
    before = _manifest_bytes(run, "sample")
    with pytest.raises(StageInputError, match=r"stage 'autoencoder' .* another config.*`latentpipe autoencoder`"):
        sample.run(_cfg(run, *SAMPLE_ARGS, "autoencoder.learning_rate=0.0005"))
    assert _manifest_bytes(run, "sample") == before
    assert manifest.read(run / "tiny" / "sample")["status"] == manifest.COMPLETE


def test_a_retrained_denoiser_renders_new_chunks(run):
    chunks = run / "tiny" / "sample" / "chunks"
    (old,) = chunks.iterdir()
    shutil.rmtree(run / "tiny" / "diffusion")
    diffusion.run(_cfg(run, "diffusion.learning_rate=0.002"))
    sample.run(_cfg(run, *SAMPLE_ARGS, "diffusion.learning_rate=0.002"))
    (new,) = chunks.iterdir()
    assert new.name != old.name and (new / "chunk-000000.npz").is_file()


def test_a_verified_file_is_hashed_once_per_process_until_it_changes(run, monkeypatch):
    prepared = artifacts.PreparedShards.from_stage_dir(_cfg(run))
    path = prepared.files("train")[0]
    hashed = []
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(path) or "x")
    assert prepared.files("train") and hashed == []
    path.write_bytes(path.read_bytes())  # same bytes, new mtime: hashed again
    with pytest.raises(StageInputError):  # (against the patched hash)
        prepared.files("train")
    assert path in hashed


def test_a_refused_encode_leaves_it_complete_and_up_to_date(run):
    """Issue 15's case: a command refused for a wrong config marked the complete stage failed,
    and the next `latentpipe run` re-encoded and retrained."""
    spec = stage_registry.get("encode")
    before = _manifest_bytes(run, "encode")
    with pytest.raises(StageInputError, match="stage 'autoencoder' .* another config"):
        encode.run(_cfg(run, "autoencoder.learning_rate=0.0005"))
    assert _manifest_bytes(run, "encode") == before
    assert manifest.up_to_date(_cfg(run), "encode", spec.sections, spec.inputs) == (True, "complete")
