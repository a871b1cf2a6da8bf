"""`latentpipe sample`: per-sample seeds make the images independent of batch size, ranks and
array tasks; chunks resume; snapping and inpainting produce what they say."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import artifacts, config, manifest
from pipeline.data.stream import sequential_batches
from pipeline.labels import labels_for
from stages import diffusion, sample
from tests.stages.test_diffusion_stage import ARGS, _cfg, _encoded
from tests.support import free_port

SAMPLE_ARGS = (
    "sample.num_samples=11",
    "sample.chunk_size=4",
    "sample.batch_size=4",
    "sample.steps=6",
    "sample.method=ddpm",
    "sample.grid=process",
    "sample.grid_rows=3",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = _encoded(tmp_path_factory.mktemp("runs"))
    diffusion.run(_cfg(root))
    return root


def _copy(source, root):
    for stage in ("prepare", "autoencoder", "encode", "diffusion"):
        shutil.copytree(source / "tiny" / stage, root / "tiny" / stage)
    return root


def _samples(root):
    with np.load(root / "tiny" / "sample" / artifacts.Samples.SAMPLES_FILE) as data:
        return data["images"], data["labels"]


def test_one_rank_equals_two_ranks_equals_another_batch_size(trained, tmp_path):
    one = _copy(trained, tmp_path / "one")
    sample.run(_cfg(one, *SAMPLE_ARGS))
    images, labels = _samples(one)
    assert images.shape == (11, 16, 16, 1) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(11)]
    assert (one / "tiny" / "sample" / artifacts.Samples.GRID_FILE).is_file()
    found = manifest.read(one / "tiny" / "sample")
    assert found["status"] == "complete" and found["samples"]["count"] == 11 and found["samples"]["nfe"] > 0

    batch = _copy(trained, tmp_path / "batch")
    sample.run(_cfg(batch, *SAMPLE_ARGS, "sample.batch_size=3", "sample.chunk_size=7"))
    assert np.array_equal(_samples(batch)[0], images)

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
            "sample",
            f"experiment.runs_dir={two}",
            *ARGS,
            *SAMPLE_ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(_samples(two)[0], images)


def test_array_tasks_write_disjoint_chunks_and_the_final_run_only_assembles(trained, tmp_path, monkeypatch):
    root = _copy(trained, tmp_path)
    cfg = _cfg(root, *SAMPLE_ARGS)
    chunk_files = []
    for task in (0, 1):
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        before = set((root / "tiny" / "sample").rglob("chunk-*.npz"))
        sample.run(cfg)
        chunk_files.append(set((root / "tiny" / "sample").rglob("chunk-*.npz")) - before)
        assert manifest.read(cfg.stage_dir("sample")) is None  # array tasks write no manifest
    assert [sorted(p.name for p in f) for f in chunk_files] == [
        ["chunk-000000.npz", "chunk-000002.npz"],
        ["chunk-000001.npz"],
    ]
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    missing = sorted(chunk_files[0])[0]
    missing.unlink()  # as if task 0 had been preempted before its first chunk
    mtimes = {p: p.stat().st_mtime_ns for p in chunk_files[0] | chunk_files[1] if p != missing}
    sample.run(cfg)
    assert missing.is_file() and all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    reference = _copy(trained, tmp_path / "reference")
    sample.run(_cfg(reference, *SAMPLE_ARGS))
    assert np.array_equal(_samples(root)[0], _samples(reference)[0])


def test_chunks_of_another_config_are_not_reused(trained, tmp_path):
    root = _copy(trained, tmp_path)
    sample.run(_cfg(root, *SAMPLE_ARGS))
    first = _samples(root)[0]
    sample.run(_cfg(root, *SAMPLE_ARGS, "sample.steps=5"))
    assert not np.array_equal(_samples(root)[0], first)
    assert len(list((root / "tiny" / "sample" / "chunks").iterdir())) == 1


def test_snapping_decodes_codebook_vectors_and_changes_the_images(trained, tmp_path):
    root = _copy(trained, tmp_path)
    cfg = _cfg(root, *SAMPLE_ARGS)
    model = artifacts.load_trained(cfg, "cpu")
    x = torch.randn(2, *model.shape)
    snapped = model.space.to_decoder(x, snap=True)
    table = model.space.codebook
    assert all((table == v).all(1).any() for v in snapped.permute(0, 2, 3, 1).reshape(-1, table.shape[1]))
    sample.run(cfg)
    snapped_images = _samples(root)[0]
    sample.run(_cfg(root, *SAMPLE_ARGS, "sample.snap=false"))
    assert not np.array_equal(_samples(root)[0], snapped_images)


def test_inpainting_grid_and_sample_shards(trained, tmp_path):
    root = _copy(trained, tmp_path)
    sample.run(_cfg(root, *SAMPLE_ARGS, "sample.inpaint=true", "sample.inpaint_count=4", "sample.write_shards=true"))
    out = root / "tiny" / "sample"
    assert (out / artifacts.Samples.INPAINT_FILE).is_file()
    shards = sorted((out / "shards").glob("samples-*.tar"))
    decoded = [b for s in shards for b in sequential_batches(str(s), 100)]
    images, labels = _samples(root)
    assert sum(len(b["key"]) for b in decoded) == 11
    assert torch.cat([b["label"] for b in decoded]).tolist() == labels.tolist()
    assert torch.equal(
        torch.cat([b["image"] for b in decoded]), torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    )


def test_labels_modes():
    cfg = _cfg("/nonexistent").sample
    assert labels_for(cfg, range(12), 10, seed=0).tolist() == [i % 10 for i in range(12)]
    assert labels_for(cfg, range(5), 0, seed=0) is None
    given = _cfg("/x", "sample.labels=given", "sample.given_labels=[3,7]").sample
    assert labels_for(given, range(4), 10, seed=0).tolist() == [3, 7, 3, 7]
    random = _cfg("/x", "sample.labels=random").sample
    first, again = labels_for(random, range(20), 10, 0), labels_for(random, range(10, 20), 10, 0)
    assert torch.equal(first[10:], again) and len(set(first.tolist())) > 3


def test_labels_in_the_train_splits_shares():
    cfg = _cfg("/x", "sample.labels=data").sample
    counts = [600, 300, 90, 10]  # imbalanced, as Twemoji's categories
    labels = labels_for(cfg, range(1000), 4, 0, counts)
    shares = torch.tensor(counts) / sum(counts)
    for n in (50, 200, 1000):  # every prefix is close to the shares (a random draw is off by ~sqrt(n))
        assert (torch.bincount(labels[:n], minlength=4) - n * shares).abs().max() <= 2
    assert torch.equal(labels_for(cfg, range(300, 400), 4, 0, counts), labels[300:400])  # order-independent
    with pytest.raises(config.ConfigError, match="class counts"):
        labels_for(cfg, range(5), 4, 0, [1, 2])


def test_the_stage_samples_labels_in_the_train_splits_shares(trained, tmp_path):
    root = _copy(trained, tmp_path / "data")
    cfg = _cfg(root, *SAMPLE_ARGS, "sample.labels=data")
    sample.run(cfg)
    _, labels = _samples(root)
    counts = artifacts.PreparedShards.from_stage_dir(cfg).class_counts("train")
    assert labels.tolist() == labels_for(cfg.sample, range(11), 10, 0, counts).tolist()
