"""Opening shard and image addresses: local paths, ``file://``, ``http(s)://`` and ``pipe:``.

A remote read has two bounds. ``timeout`` limits each socket operation (a stalled connection);
``deadline`` limits the whole transfer, because a server that trickles a few bytes per second
keeps every single read under the timeout forever. An HTTP body is also checked against its
Content-Length: ``http.client`` returns a body cut short by a closed connection as if it were
complete. The deadline is checked between reads, so a transfer stops within
``deadline + timeout`` seconds. ``pipe:`` commands (e.g. ``pipe:aws s3 cp s3://b/x.tar -``) are
bounded by their own tool.
"""

from __future__ import annotations

import glob
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds

from pipeline.errors import LatentpipeError

_HTTP = re.compile(r"^https?://")
_CHUNK = 1 << 20


class StreamError(LatentpipeError):
    """Shards that cannot be streamed: no match, unreachable, damaged, no data for a rank, bad layout."""


class TransferError(StreamError):
    """A shard or image that could not be fetched completely: unreachable, slower than its
    deadline, or cut short."""


def expand_urls(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a directory, glob, brace pattern, URL or a list of any of those."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_urls(item)]
    spec = str(spec)
    if re.match(r"^(https?|pipe|file):", spec):
        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        urls = [u for pattern in braceexpand.braceexpand(spec) for u in sorted(glob.glob(pattern)) or [pattern]]
    if not urls:
        raise StreamError(f"no shards match {spec!r}")
    return urls


class _HTTPBody:
    """An HTTP response body read against a deadline and checked against its Content-Length."""

    def __init__(self, response: http.client.HTTPResponse, url: str, deadline: float):
        self._response, self.url, self.deadline = response, url, deadline
        length = response.headers.get("Content-Length")
        self._expected = int(length) if length is not None else None
        self._received = 0
        self._ends_at = time.monotonic() + deadline

    def read(self, size: int = -1, /) -> bytes:
        """``size`` bytes (all the rest when negative); fewer only at the end of a complete body."""
        chunks = []
        remaining = size if size >= 0 else None
        while remaining is None or remaining > 0:
            if time.monotonic() > self._ends_at:
                raise TransferError(
                    f"{self.url}: the transfer did not finish within its {self.deadline:g} s deadline "
                    f"({self._received} bytes received); the server is too slow or stalled"
                )
            try:
                chunk = self._response.read1(_CHUNK if remaining is None else min(remaining, _CHUNK))
            except (OSError, http.client.HTTPException) as err:
                raise TransferError(f"{self.url}: connection failed after {self._received} bytes: {err}") from None
            if not chunk:
                if self._expected is not None and self._received < self._expected:
                    raise TransferError(
                        f"{self.url}: the body ends after {self._received} of its {self._expected} "
                        f"bytes (Content-Length): the connection closed early"
                    )
                break
            chunks.append(chunk)
            self._received += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> _HTTPBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_url(url: str, timeout: float, deadline: float) -> Any:
    """A readable binary stream for a shard or image address (a context manager). Unreachable
    addresses fail fast; HTTP bodies are read within ``deadline`` seconds and checked against
    their Content-Length (:class:`TransferError`)."""
    if _HTTP.match(url):
        try:
            response = urllib.request.urlopen(url, timeout=min(timeout, deadline))
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise TransferError(
                f"cannot reach {url}: {err}. Check the address and that the server is up (timeout {timeout:g} s)"
            ) from None
        return _HTTPBody(response, url, deadline)
    if url.startswith("pipe:"):
        return wds.gopen(url)
    path = url[len("file://") :] if url.startswith("file://") else url
    if not os.path.exists(path):
        raise TransferError(f"{path} does not exist")
    return open(path, "rb")


def is_remote(address: str) -> bool:
    return bool(_HTTP.match(address))


def fetch(url: str, timeout: float, deadline: float) -> bytes:
    """The whole body at ``url``, within ``deadline`` seconds."""
    with open_url(url, timeout, deadline) as body:
        return body.read()
