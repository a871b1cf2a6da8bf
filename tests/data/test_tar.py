"""The hand-written tar reader against the standard library's, and its strict end of archive."""

import io
import tarfile

import pytest

from pipeline.data import tar

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}
LONG_DIR = "d" * 120  # a ustar prefix (<= 155 bytes)
LONG_FILE = "sample_" + "n" * 80 + ".png"  # with the directory, a name over the 100-byte field


def _names(fmt):
    names = [f"{LONG_DIR}/{LONG_FILE}", "short.cls", "000001.json"]
    if fmt != "ustar":  # ustar cannot store a last path part over 100 bytes or non-ASCII names
        names += ["x" * 180 + ".npy", "ünïcode/ключ.txt", "a/" + "b" * 300 + ".tar.gz"]
    return names


def _archive(fmt, sizes=(0, 1, 511, 512, 513, 4096, 10_000)) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A tar in ``fmt`` with regular files of awkward sizes and names, a directory and a symlink."""
    buffer = io.BytesIO()
    expected = []
    with tarfile.open(fileobj=buffer, mode="w", format=FORMATS[fmt]) as archive:
        directory = tarfile.TarInfo(LONG_DIR)
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for i, name in enumerate(_names(fmt)):
            for size in sizes:
                member_name = name.replace(".", f"_{size}.", 1)
                data = bytes((i * 7 + j) % 251 for j in range(size))
                info = tarfile.TarInfo(member_name)
                info.size = size
                info.mtime = 1_700_000_000
                archive.addfile(info, io.BytesIO(data))
                expected.append((member_name, data))
        link = tarfile.TarInfo("link-to-short.cls")
        link.type, link.linkname = tarfile.SYMTYPE, "short.cls"
        archive.addfile(link)
    return buffer.getvalue(), expected


def _stdlib(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive if m.isreg()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_members_equal_tarfiles_on_every_format_with_long_names(fmt):
    data, expected = _archive(fmt)
    ours = list(tar.members(io.BytesIO(data)))
    assert ours == _stdlib(data) == expected
    assert max(len(name) for name, _ in ours) > 100


def test_pax_size_record_overrides_the_header_field():
    """A pax ``size`` record (members over 8 GiB) wins over the ustar field, as in tarfile."""
    payload = b"p" * 700
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("big.bin")
        info.size, info.pax_headers = len(payload), {"size": str(len(payload)), "comment": "a=b\nc=d"}
        archive.addfile(info, io.BytesIO(payload))
    data = bytearray(buffer.getvalue())
    member = data.index(b"big.bin", 512) - data.index(b"big.bin", 512) % 512  # the member's own header
    data[member + 124 : member + 136] = b"00000000000\0"
    data[member + 148 : member + 156] = b" " * 8
    data[member + 148 : member + 156] = b"%06o\0 " % sum(data[member : member + 512])
    assert list(tar.members(io.BytesIO(bytes(data)))) == _stdlib(bytes(data)) == [("big.bin", payload)]


def test_base256_numbers_of_gnu_headers():
    assert tar._number(tarfile.itn(2**40 + 5, 12, tarfile.GNU_FORMAT)) == 2**40 + 5
    assert tar._number(b"0000644\0") == 0o644


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_archive_cut_anywhere_before_its_end_marker_is_damaged(fmt):
    data, expected = _archive(fmt, sizes=(3, 700, 5000))
    end = len(data.rstrip(b"\0"))
    end += -end % 512  # the end-of-archive marker starts here
    cuts = sorted({*range(512, end + 1, 512), *range(4096, end + 1, 4096), end - 1, 700, 1234})
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        member_starts = {m.offset for m in archive.getmembers() if m.isreg()}
    stdlib_silent = set()
    for cut in cuts:
        stream = io.BytesIO(data[:cut])
        got = []
        with pytest.raises(tar.DamagedTarError, match="cut short"):
            for member in tar.members(stream):
                got.append(member)
        assert got == expected[: len(got)], "the members before the damage are intact"
        assert len(got) < len(expected) or cut >= end - 512
        try:
            if len(_stdlib(data[:cut])) < len(expected):
                stdlib_silent.add(cut)
        except tarfile.ReadError:
            pass
    # the reason for a hand-written reader: tarfile takes a cut at any member boundary for an end
    assert member_starts & set(cuts) and member_starts & set(cuts) <= stdlib_silent
    # one zero block is an end of archive (GNU tar accepts a lone one): nothing was lost
    assert list(tar.members(io.BytesIO(data[: end + 512]))) == expected


def test_a_corrupt_header_is_damaged():
    data, expected = _archive("gnu", sizes=(10,))
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        second = [m for m in archive.getmembers() if m.isreg()][1]
    flipped = bytearray(data)
    flipped[second.offset_data - 512 + 5] ^= 0xFF  # in the member's own header
    got = []
    with pytest.raises(tar.DamagedTarError, match="corrupt tar header at byte"):
        for member in tar.members(io.BytesIO(bytes(flipped))):
            got.append(member)
    assert got == expected[:1]
