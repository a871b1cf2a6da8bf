"""`latentpipe encode`: latents equal the autoencoder's, 1 rank == 2 ranks, reruns are safe."""

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import artifacts, config, manifest
from pipeline.autoencoder.build import build_autoencoder
from pipeline.data.stream import read_shard, sequential_batches
from pipeline.errors import LatentpipeError
from stages import autoencoder, encode, prepare
from tests.support import free_port

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
]


def _cfg(root, *extra):
    return config.load(overrides=[f"experiment.runs_dir={root}", *ARGS, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = _cfg(root)
    prepare.run(cfg)
    autoencoder.run(cfg)
    return root


def _copy(trained, root):
    for stage in ("prepare", "autoencoder"):
        shutil.copytree(trained / "tiny" / stage, root / "tiny" / stage)
    return root


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted((directory / artifacts.EncodedLatents.LATENT_DIR).glob("*.tar"))}


def test_latents_are_the_autoencoders_codes_and_decode_back(trained, tmp_path):
    cfg = _cfg(_copy(trained, tmp_path))
    out = encode.run(cfg)
    found = manifest.read(out)
    assert found["latent"]["fields"] == ["codes", "codes_flip"] and found["latent"]["scale"] > 0
    model = build_autoencoder(cfg.autoencoder, 1)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(cfg.stage_dir("autoencoder") / artifacts.TrainedAutoencoder.WEIGHTS_FILE))
    model.eval()
    shard = sorted(cfg.stage_dir("prepare").glob("val-*.tar"))[0]
    images = next(iter(sequential_batches(str(shard), 8)))
    latents = list(read_shard(str(out / artifacts.EncodedLatents.LATENT_DIR / shard.name), 5))[:8]
    with torch.no_grad():
        expected = model.encode(images["image"]).indices
        expected_flip = model.encode(images["image"].flip(-1)).indices
    for i, sample in enumerate(latents):
        assert sample["__key__"] == images["key"][i]
        codes = torch.from_numpy(np.load(io.BytesIO(sample["codes.npy"])))
        assert torch.equal(codes.long(), expected[i])
        assert torch.equal(torch.from_numpy(np.load(io.BytesIO(sample["codes_flip.npy"]))).long(), expected_flip[i])
    table = load_file(out / artifacts.EncodedLatents.CODEBOOK_FILE)["embeddings"]
    assert table.shape == (32, 4)
    assert torch.allclose(table[expected[0]].permute(2, 0, 1), model.codebook.embed(expected[:1])[0], atol=1e-6)


def test_two_ranks_write_disjoint_shards_equal_to_one_rank(trained, tmp_path):
    one = _copy(trained, tmp_path / "one")
    encode.run(_cfg(one))
    two = _copy(trained, tmp_path / "two")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "pipeline.cli",
            "-q",
            "encode",
            f"experiment.runs_dir={two}",
            *ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files(one / "tiny" / "encode") == _files(two / "tiny" / "encode")
    a, b = (manifest.read(r / "tiny" / "encode")["latent"] for r in (one, two))
    assert a == b


def test_rerun_after_a_new_autoencoder_reencodes_everything(trained, tmp_path):
    root = _copy(trained, tmp_path)
    first = _files(encode.run(_cfg(root)))
    autoencoder.run(_cfg(root, "autoencoder.max_steps=7", "experiment.seed=1"))  # a different autoencoder
    second = _files(encode.run(_cfg(root, "autoencoder.max_steps=7", "experiment.seed=1")))
    assert first.keys() == second.keys() and first != second


def test_refuses_an_autoencoder_trained_with_another_config(trained, tmp_path):
    cfg = _cfg(_copy(trained, tmp_path), "autoencoder.num_codes=64")
    with pytest.raises(LatentpipeError, match="made with another config"):
        encode.run(cfg)


@pytest.mark.parametrize("normalize", ["channel", "scale"])
def test_kl_statistics_bring_the_posterior_samples_training_sees_to_unit_variance(tmp_path, normalize):
    """The diffusion model trains on z = mu + sigma eps; statistics of the means alone would leave
    those samples several times too wide when sigma is not small (as early in KL training)."""
    cfg = _cfg(tmp_path, "autoencoder.kind=kl")
    prepare.run(cfg)
    autoencoder.run(cfg)
    encode.run(cfg)
    encoded = artifacts.EncodedLatents.from_stage_dir(cfg)
    space = encoded.latent_space(normalize)
    shards = [str(path) for path in encoded.files("train")]
    z = torch.cat(
        [
            space.from_batch(batch, generator=torch.Generator().manual_seed(i))
            for i, batch in enumerate(sequential_batches(shards, 64))
        ]
    ).double()
    assert abs(float(z.std()) - 1.0) < 0.05  # "scale" shifts nothing (LDM): the std is about the mean
    if normalize == "channel":
        assert float(z.mean(dim=(0, 2, 3)).abs().max()) < 0.05
        torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(z.shape[1], dtype=z.dtype), atol=0.06, rtol=0)
