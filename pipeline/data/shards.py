"""Writing WebDataset shards: ``{split}-%06d.tar`` with one sample per ``__key__``.

Each shard is written through webdataset's ``TarWriter`` into a temporary file and renamed to
its final name only when it is closed, so an interrupted job never leaves a truncated shard
under a final name. Shards roll over at a sample count or a byte size, whichever comes first.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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


def make_sample(key: str, image_bytes: bytes, image_format: str, label: Optional[int], meta: dict) -> dict:
    sample: dict[str, Any] = {"__key__": key, image_format: image_bytes, "json": json.dumps(meta).encode()}
    if label is not None:
        sample["cls"] = str(label).encode()
    return sample


class ShardWriter:
    """Rolls samples into size/count-limited shards named ``{split}-%06d.tar``.

    ``on_shard(info)`` is called after each shard has been renamed to its final name, which is
    where a caller records progress so a rerun can continue after the last complete shard.
    """

    def __init__(self, directory: Path, split: str, *, max_count: int, max_bytes: int,
                 first_index: int = 0, on_shard=None):
        self.directory = Path(directory)
        self.split = split
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.index = first_index
        self.on_shard = on_shard
        self._file = self._tar = None
        self._tmp: Optional[Path] = None
        self._count = 0

    def _open(self) -> None:
        final = self.directory / SHARD_PATTERN.format(split=self.split, index=self.index)
        self._tmp = final.with_name(f".{final.name}{atomic.TMP_SUFFIX}")
        self._file = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=SHARD_MTIME)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()  # closes the underlying file too
        final = self.directory / SHARD_PATTERN.format(split=self.split, index=self.index)
        with open(self._tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._tmp, final)
        info = ShardInfo(final.name, self._count, final.stat().st_size)
        self._file = self._tar = self._tmp = None
        self.index += 1
        if self.on_shard is not None:
            self.on_shard(info)

    def write(self, sample: dict) -> None:
        size = sum(len(v) for k, v in sample.items() if k != "__key__")
        if self._tar is not None and (
            self._count >= self.max_count or (self._count and self._file.tell() + size > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the open shard (its temporary file) without publishing it."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._file = self._tar = self._tmp = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
