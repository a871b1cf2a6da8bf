import numpy as np
import pytest
import torch

from pipeline import atomic
from pipeline.metrics.fid import FeatureStats
from pipeline.metrics.reference import cache_key, reference_features


class Projection:
    """A stand-in feature extractor: a fixed linear map of the flattened images."""

    def __init__(self, version="a"):
        self.identity = {"network": "projection", "version": version}
        self.matrix = torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(0))

    def __call__(self, images):
        return images.flatten(1) @ self.matrix


class Batches:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(1)
        return [torch.rand(5, 3, 4, 4, generator=g) * 2 - 1 for _ in range(3)]


def test_miss_computes_and_stores_then_hit_reads_without_images(tmp_path):
    source, extractor, batches = {"shards": "sha256:abc", "images": 15}, Projection(), Batches()
    first = reference_features(tmp_path, source, extractor, batches)
    assert batches.calls == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"{cache_key(source, extractor.identity)}.npz"]
    expected = torch.cat([extractor(b) for b in Batches()()]).numpy()
    np.testing.assert_array_equal(first.features, expected)
    stats = FeatureStats.of(expected)
    np.testing.assert_array_equal(first.stats.cov, stats.cov)
    assert first.stats.count == 15

    again = reference_features(tmp_path, dict(reversed(source.items())), extractor, batches)
    assert batches.calls == 1  # key order does not matter; the cached file answered
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(again.stats.mean, first.stats.mean)
    np.testing.assert_array_equal(again.stats.cov, first.stats.cov)
    assert again.stats.count == 15


@pytest.mark.parametrize(
    "source, version",
    [
        ({"shards": "sha256:def", "images": 15}, "a"),
        ({"shards": "sha256:abc", "images": 10}, "a"),
        ({"shards": "sha256:abc", "images": 15}, "b"),
    ],
)
def test_another_source_or_extractor_is_a_miss(tmp_path, source, version):
    batches = Batches()
    reference_features(tmp_path, {"shards": "sha256:abc", "images": 15}, Projection("a"), batches)
    reference_features(tmp_path, source, Projection(version), batches)
    assert batches.calls == 2 and len(list(tmp_path.iterdir())) == 2


def test_a_failed_write_leaves_no_file_and_the_next_run_fills_it(tmp_path, monkeypatch):
    source, batches = {"shards": "x"}, Batches()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        reference_features(tmp_path, source, Projection(), batches)
    assert list(tmp_path.iterdir()) == []  # neither the entry nor a temporary file
    monkeypatch.undo()
    reference_features(tmp_path, source, Projection(), batches)
    reference_features(tmp_path, source, Projection(), batches)
    assert batches.calls == 2 and len(list(tmp_path.iterdir())) == 1
