"""The members of an uncompressed tar stream, read strictly: a cut or corrupt archive is an error.

Why not :mod:`tarfile` (which webdataset's ``tar_file_iterator`` wraps): after the first member,
``tarfile.TarFile.next`` treats an end of file at a header boundary, a partial header and even an
invalid header as the normal end of the archive. A shard cut at a 512- or 4096-byte boundary
(a half-served HTTP body, a copy interrupted by a full disk) therefore reads as a shorter valid
shard and its lost samples go unnoticed. Here the archive must end with its end-of-archive
marker: POSIX writers (tarfile, webdataset's ``TarWriter``, GNU tar) close every archive with two
zero blocks and pad it to a 10 KiB record. The first zero block is taken as the end (GNU tar
accepts a lone one, with a warning): a file that still holds it lost no member, while a file that
ends anywhere before it -- at a header boundary, inside a header, inside a member's data or
padding -- is reported as :class:`DamagedTarError` with the byte offset. It is also faster than
tarfile on the small members of image and latent shards (docs/benchmarks.md, tools/bench_data.py).

Formats (POSIX.1-1988 ustar, POSIX.1-2001 pax, GNU): ustar names with their 155-byte prefix, pax
extended headers ('x': ``path`` and ``size``; global 'g' headers carry no per-member data and are
skipped), GNU long names ('L'), base-256 sizes of members over 8 GiB, and the old signed-byte
checksum. Regular files ('0', NUL, '7') are yielded; other members (directories, links) are read
past.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from pipeline.errors import LatentpipeError

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


class Readable(Protocol):
    """What the reader needs of a stream: ``read(n)`` returns n bytes, fewer only at the end."""

    def read(self, size: int = ..., /) -> bytes: ...


class DamagedTarError(LatentpipeError):
    """A tar stream that ends early or holds a corrupt header: the shard is damaged."""


def _number(field: bytes) -> int:
    """An octal header number, or GNU base-256 (high bit of the first byte set) for large sizes."""
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax header (the length counts the whole record,
    so values may hold newlines or '=')."""
    records = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    unsigned = sum(header[:148]) + 8 * 0x20 + sum(header[156:])
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)  # pre-POSIX writers
    return stored == signed


def members(stream: Readable) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of the tar ``stream``, in archive order.

    Raises :class:`DamagedTarError` (after yielding every member before the damage) when the
    stream ends before the end-of-archive marker or a header is corrupt.
    """
    offset = 0
    pending: dict[str, str] = {}  # from a pax or GNU long-name header, for the next member
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            where = "inside a header" if header else "without the end-of-archive marker"
            raise DamagedTarError(f"tar data ends at byte {offset + len(header)} {where}: the file is cut short")
        if header.count(0) == BLOCK:
            return
        try:
            if not _checksum_ok(header):
                raise ValueError("bad header checksum")
            size = int(pending["size"]) if "size" in pending else _number(header[124:136])
        except (ValueError, IndexError) as err:
            raise DamagedTarError(f"corrupt tar header at byte {offset}: {err}") from None
        data = stream.read(size)
        padding = stream.read(-size % BLOCK)
        if len(data) < size or len(padding) < -size % BLOCK:
            got = offset + BLOCK + len(data) + len(padding)
            raise DamagedTarError(f"tar data ends at byte {got} inside a member's data: the file is cut short")
        offset += BLOCK + size + len(padding)
        kind = header[156:157]
        if kind == b"x":
            try:
                pending.update(_pax_records(data))
            except ValueError as err:
                raise DamagedTarError(f"corrupt pax header at byte {offset}: {err}") from None
            continue
        if kind == b"L":
            pending["path"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind not in _REGULAR:
            pending = {}
            continue
        name = pending.get("path")
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}" if prefix else name
        pending = {}
        yield name, data
