"""Atomic file writes: a reader sees the old file or the complete new one, never a torn write.

Everything a stage leaves behind (manifests, shards, checkpoints, images) goes through here:
write to a temporary sibling, flush to disk, then ``os.replace`` onto the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline.errors import LatentpipeError

TMP_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(LatentpipeError):
    """A write failed for lack of space (or quota); the message names the file system to free."""


@contextlib.contextmanager
def disk_full_as_error(what: str, where: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) while writing ``what`` under ``where`` into a
    :class:`DiskFullError` that says so instead of a traceback; other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        raise DiskFullError(
            f"no space left writing {what} in {where} ({err.strerror}): free space there "
            f"and rerun the same command (finished parts are kept)"
        ) from err


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256, streamed in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems (e.g. certain network mounts) refuse
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)
