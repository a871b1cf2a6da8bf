"""The samples of one shard: tar members grouped by key as WebDataset does, and decoded.

A member ``dir/key.field.ext`` belongs to sample ``dir/key``, field ``field.ext``; a sample ends
where the next key starts. A damaged shard (cut short, corrupt header, short HTTP body, missed
deadline) raises after the complete samples before the damage: the sample being read when the
damage is found is dropped, never yielded with missing fields.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from pipeline.data import tar, transforms
from pipeline.data.remote import StreamError, open_url
from pipeline.errors import LatentpipeError

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
SHARD_DEADLINE = 3600.0
"""Seconds one shard's transfer may take by default: the largest default shard (1 GiB) at 0.3 MB/s."""


class DamagedShardError(StreamError):
    """A shard whose tar data ends early or is corrupt (skipped and counted unless on_error='raise')."""


class SampleDecodeError(LatentpipeError, ValueError):
    """One sample that cannot be decoded (skipped and counted unless on_error='raise')."""


def read_shard(url: str, timeout: float = 30.0, deadline: float = SHARD_DEADLINE) -> Iterator[dict]:
    """Samples (``__key__``, ``__url__`` + raw bytes per field) of one shard, in tar order.

    ``timeout`` bounds each remote read, ``deadline`` the whole transfer (pipeline.data.remote).
    Raises :class:`DamagedShardError` or :class:`~pipeline.data.remote.TransferError` after the
    complete samples before the damage.
    """
    with open_url(url, timeout, deadline) as stream:
        sample: dict | None = None
        try:
            for name, data in tar.members(stream):
                key, field = base_plus_ext(name)
                if key is None or key.startswith("__") or "/__" in key:
                    continue
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                sample[field.lower()] = data
        except tar.DamagedTarError as err:
            raise DamagedShardError(f"shard {url} is damaged: {err}") from None
        if sample is not None:
            yield sample


def count_samples(urls: Sequence[str], timeout: float = 30.0, deadline: float = SHARD_DEADLINE) -> int:
    """Number of samples in the shards (reads them whole: a damaged shard raises)."""
    return sum(1 for url in urls for _ in read_shard(url, timeout, deadline))


def decode_sample(sample: dict, with_meta: bool = True) -> dict:
    """Raw fields -> python/torch values: images -> float (C,H,W) in [-1,1], npy -> tensor
    ("array", or ``name`` for ``name.npy``, e.g. the encode stage's codes), cls -> int,
    json -> object (only ``with_meta``), txt -> str. Unknown fields are dropped."""
    out: dict[str, Any] = {"key": sample["__key__"]}
    try:
        for name, value in sample.items():
            if name in IMAGE_FIELDS:
                out["image"] = transforms.image_to_tensor(Image.open(io.BytesIO(value)))
            elif name == "npy" or name.endswith(".npy"):
                field = "array" if name == "npy" else name.removesuffix(".npy")
                out[field] = torch.from_numpy(np.load(io.BytesIO(value), allow_pickle=False))
            elif name == "cls":
                out["label"] = int(value)
            elif name == "json" and with_meta:
                out["meta"] = json.loads(value)
            elif name == "txt":
                out["text"] = value.decode("utf-8")
    except Exception as err:
        raise SampleDecodeError(f"sample {sample['__key__']} in {sample.get('__url__')}: {err}") from err
    return out
