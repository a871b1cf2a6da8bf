"""Reference features of a real image set, computed once and cached under a hash of their inputs.

FID needs the reference mean and covariance; KID and precision/recall need the features
themselves, so one cache file holds both: ``<directory>/<key>.npz`` with ``features``
(float32), ``mean``, ``cov``, ``count`` and ``inputs`` (the JSON the key hashes, for people
reading the cache). The key is the sha256 of the canonical JSON of ``source`` (what identifies
the images: e.g. the shard set's hashes and the number of images taken) together with the
extractor's ``identity`` (network weights and preprocessing), so a change in either is a miss.
Files are written atomically (pipeline.atomic): a reader finds a complete file or none, and
ranks that race to fill the same entry write the same content. A file damaged later fails its
zip CRC check on load and is computed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline import atomic
from pipeline.metrics.fid import FeatureStats

log = logging.getLogger(__name__)


class FeatureExtractor(Protocol):
    """Images -> features, with an ``identity`` (weights and preprocessing) for the cache key."""

    identity: Mapping[str, Any]

    def __call__(self, images: torch.Tensor, /) -> torch.Tensor: ...


@dataclass(frozen=True)
class Reference:
    features: np.ndarray
    """(N, d) float32."""
    stats: FeatureStats


def evenly_spread(total: int, count: int) -> set[int]:
    """Indices floor(i * total / count) of ``count`` items (at most ``total``) spread evenly over
    ``total``: shards written in source order can hold one class each, so the first ``count``
    would not be a fair sample."""
    count = min(count, total)
    return {i * total // count for i in range(count)}


def cache_inputs(source: Mapping[str, Any], extractor_identity: Mapping[str, Any]) -> str:
    """The canonical JSON that :func:`cache_key` hashes."""
    return json.dumps({"source": source, "extractor": extractor_identity}, sort_keys=True, separators=(",", ":"))


def cache_key(source: Mapping[str, Any], extractor_identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(cache_inputs(source, extractor_identity).encode()).hexdigest()


def reference_features(
    directory: str | Path,
    source: Mapping[str, Any],
    extractor: FeatureExtractor,
    batches: Callable[[], Iterable[torch.Tensor]],
) -> Reference:
    """The cached reference for ``(source, extractor.identity)``, or on a miss: the features of
    every image batch that ``batches()`` yields (images as the extractor takes them), stored.

    ``batches`` is called only on a miss, so a cached reference costs no reading of images.
    """
    inputs = cache_inputs(source, extractor.identity)
    file = Path(directory) / f"{cache_key(source, extractor.identity)}.npz"
    if file.is_file():
        try:
            with np.load(file, allow_pickle=False) as data:  # zip CRCs: a damaged file does not load
                stats = FeatureStats(mean=data["mean"], cov=data["cov"], count=int(data["count"]))
                return Reference(features=data["features"], stats=stats)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            log.warning("reference features %s are damaged (%s); computing them again", file, err)
    features = torch.cat([extractor(images).cpu() for images in batches()]).float().numpy()
    stats = FeatureStats.of(features)
    buffer = io.BytesIO()
    np.savez(
        buffer, features=features, mean=stats.mean, cov=stats.cov, count=np.int64(stats.count), inputs=np.array(inputs)
    )
    atomic.write_bytes(file, buffer.getvalue())
    return Reference(features=features, stats=stats)
