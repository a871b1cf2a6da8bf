"""Elastic resume of the data stream: a loader position saved by N ranks continues on M ranks
(and another number of workers) so that over the epoch every sample is seen exactly once;
with the same layout resume stays bit-identical."""

from collections import Counter

import pytest
import torch

from pipeline.data.stream import ShardLoader, StreamError
from tests.data.test_stream import _write_shards

BATCH = 4
SIZES = [12] * 12  # 144 samples: every layout below divides its share evenly


def _loaders(urls, world_size, workers):
    return [
        ShardLoader(
            urls,
            batch_size=BATCH,
            rank=rank,
            world_size=world_size,
            num_workers=workers,
            seed=3,
            shuffle_buffer=20,
            flip=True,
        )
        for rank in range(world_size)
    ]


def _take(loaders, batches, keys):
    """Each rank takes ``batches`` batches (as synchronous training does); their keys go to ``keys``."""
    for loader in loaders:
        stream = iter(loader)
        for _ in range(batches):
            keys.extend(next(stream)["key"])
        stream.close()
    return [loader.state_dict() for loader in loaders]


def _rest_of_epoch(loaders, keys):
    epoch = loaders[0].epoch
    for loader in loaders:
        for batch in loader:
            keys.extend(batch["key"])
        assert loader.epoch == epoch + 1
    assert len({len(loader) for loader in loaders}) == 1


@pytest.mark.parametrize(
    "plan",
    [
        [(2, 0, 6), (1, 0, None)],
        [(1, 0, 12), (2, 2, None)],
        [(2, 0, 6), (3, 0, None)],
        [(2, 1, 6), (3, 2, 2), (1, 0, None)],  # two changes within one epoch, workers too
    ],
)
def test_every_sample_once_per_epoch_across_changes_of_the_world_size(tmp_path, plan):
    urls = _write_shards(tmp_path, SIZES)
    keys: list[str] = []
    states = None
    for world_size, workers, batches in plan:
        loaders = _loaders(urls, world_size, workers)
        if states is not None:
            for loader in loaders:
                loader.resume(states)
        if batches is None:
            _rest_of_epoch(loaders, keys)
        else:
            states = _take(loaders, batches, keys)
    counts = Counter(keys)
    assert len(counts) == sum(SIZES) and set(counts.values()) == {1}, [k for k, n in counts.items() if n != 1]

    # the next epoch runs under the new layout from its start: every sample once again
    again: list[str] = []
    _rest_of_epoch(loaders, again)
    assert sorted(again) == sorted(counts)


def test_the_same_layout_resumes_bit_identically(tmp_path):
    urls = _write_shards(tmp_path, SIZES)
    straight = [list(loader) for loader in _loaders(urls, 2, 0)]
    states = _take(_loaders(urls, 2, 0), 5, [])
    for rank, loader in enumerate(_loaders(urls, 2, 0)):
        loader.resume(states)
        for expected, got in zip(straight[rank][5:], loader, strict=True):
            assert expected["key"] == got["key"] and torch.equal(expected["image"], got["image"])


def test_a_resumed_rest_of_an_epoch_resumes_exactly_too(tmp_path):
    """A checkpoint taken in the rest of an epoch (after a change) and resumed on that layout
    continues with the batches the uninterrupted rest would have given."""
    urls = _write_shards(tmp_path, SIZES)
    states = _take(_loaders(urls, 2, 0), 6, [])
    whole = _loaders(urls, 3, 0)
    for loader in whole:
        loader.resume(states)
    expected = [list(loader) for loader in whole]
    part = _loaders(urls, 3, 0)
    for loader in part:
        loader.resume(states)
    middle = _take(part, 3, [])
    for rank, loader in enumerate(_loaders(urls, 3, 0)):
        loader.resume(middle)
        assert [b["key"] for b in loader] == [b["key"] for b in expected[rank][3:]]


def test_a_changed_batch_size_or_seed_is_refused(tmp_path):
    urls = _write_shards(tmp_path, SIZES)
    states = _take(_loaders(urls, 2, 0), 2, [])
    other = ShardLoader(urls, batch_size=BATCH * 2, world_size=1, seed=3)
    with pytest.raises(StreamError, match="batch_size: 4 -> 8"):
        other.resume(states)
