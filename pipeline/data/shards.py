"""Writing WebDataset shards: ``{split}-%06d.tar`` with one sample per ``__key__``.

Each shard is written through webdataset's ``TarWriter`` into a temporary file and renamed to
its final name only when it is closed, so an interrupted job never leaves a truncated shard
under a final name. Shards roll over at a sample count or a byte size, whichever comes first.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds
from PIL import Image

from pipeline import atomic

SHARD_PATTERN = "{split}-{index:06d}.tar"
IMAGE_EXTENSIONS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# An integer mtime keeps tarfile from adding a pax header to every member (float times need
# one), which halves header parsing when reading; fixed, it makes equal inputs give equal shards.
SHARD_MTIME = 946684800  # 2000-01-01T00:00:00Z


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int


def encode_image(image: Image.Image, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, IMAGE_EXTENSIONS[image_format], quality=quality)
    return buffer.getvalue()


def make_sample(key: str, image_bytes: bytes, image_format: str, label: int | None, meta: dict) -> dict:
    sample: dict[str, Any] = {"__key__": key, image_format: image_bytes, "json": json.dumps(meta).encode()}
    if label is not None:
        sample["cls"] = str(label).encode()
    return sample


@dataclass
class _OpenShard:
    """The shard being written: its temporary file, the tar writer over it, samples so far."""

    file: BinaryIO
    tar: wds.TarWriter
    tmp: Path
    final: Path
    count: int = 0


class ShardWriter:
    """Rolls samples into size/count-limited shards named ``{split}-%06d.tar``.

    ``on_shard(info)`` is called after each shard has been renamed to its final name, which is
    where a caller records progress so a rerun can continue after the last complete shard.
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        *,
        max_count: int,
        max_bytes: int,
        first_index: int = 0,
        on_shard: Callable[[ShardInfo], None] | None = None,
    ):
        self.directory = Path(directory)
        self.split = split
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.index = first_index
        self.on_shard = on_shard
        self._shard: _OpenShard | None = None

    def _open(self) -> _OpenShard:
        final = self.directory / SHARD_PATTERN.format(split=self.split, index=self.index)
        tmp = final.with_name(f".{final.name}{atomic.TMP_SUFFIX}")
        file = open(tmp, "wb")  # closed by the tar writer in _finish or abort
        return _OpenShard(file, wds.TarWriter(file, encoder=False, mtime=SHARD_MTIME), tmp, final)

    def _finish(self, shard: _OpenShard) -> None:
        shard.tar.close()  # closes the underlying file too
        with open(shard.tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(shard.tmp, shard.final)
        info = ShardInfo(shard.final.name, shard.count, shard.final.stat().st_size)
        self._shard = None
        self.index += 1
        if self.on_shard is not None:
            self.on_shard(info)

    def write(self, sample: dict) -> None:
        size = sum(len(v) for k, v in sample.items() if k != "__key__")
        shard = self._shard
        if shard is not None and (
            shard.count >= self.max_count or (shard.count and shard.file.tell() + size > self.max_bytes)
        ):
            self._finish(shard)
            shard = None
        if shard is None:
            shard = self._shard = self._open()
        shard.tar.write(sample)
        shard.count += 1

    def close(self) -> None:
        if self._shard is not None:
            self._finish(self._shard)

    def abort(self) -> None:
        """Drop the open shard (its temporary file) without publishing it."""
        if self._shard is not None:
            self._shard.tar.close()
            self._shard.tmp.unlink(missing_ok=True)
            self._shard = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
