"""Cached reference features under damage: a flipped byte in the cache file is caught by its zip
CRC and the features are computed again (never a silent load of wrong statistics)."""

import numpy as np

from pipeline.metrics.reference import cache_key, reference_features
from tests.metrics.test_reference import Batches, Projection


def test_damaged_reference_features_are_computed_again(tmp_path, caplog):
    source, extractor, batches = {"shards": ["abc"], "images": 15}, Projection(), Batches()
    first = reference_features(tmp_path, source, extractor, batches)
    file = tmp_path / f"{cache_key(source, extractor.identity)}.npz"
    data = bytearray(file.read_bytes())
    data[200] ^= 0xFF  # inside the first array's data
    file.write_bytes(bytes(data))
    again = reference_features(tmp_path, source, extractor, batches)
    assert batches.calls == 2 and "damaged" in caplog.text
    np.testing.assert_array_equal(again.features, first.features)
    assert reference_features(tmp_path, source, extractor, batches) is not None and batches.calls == 2
