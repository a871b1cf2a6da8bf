"""Throughput of the shard loader against plain torch.utils.data over a folder, same run.

Image shards (decode + flip augmentation) and small numeric samples (.npy latents), each
read by ``ShardLoader`` from WebDataset shards and by a map-style ``Dataset`` over a folder
holding the same samples as individual files. Prints a Markdown table: median of
``--repeats`` epochs, samples/s in total and per worker, and the shard/folder ratio.

    python tools/bench_data.py --workers 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import platform
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import config
from pipeline.data import shards
from pipeline.data.stream import ShardLoader
from pipeline.data.transforms import augment, image_to_tensor
from pipeline.seeding import generator
from stages import prepare


class FolderImages(torch.utils.data.Dataset):
    """The baseline: one PNG per file, decoded and flipped like the shard loader does."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = image_to_tensor(Image.open(self.files[index]))
        return augment(image, generator(0, index), flip=True, crop=None)


class FolderArrays(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return torch.from_numpy(np.load(self.files[index]))


def _prepare_images(root: Path, resolution: int, color: str, image_format: str) -> tuple[list[str], list[Path]]:
    cfg = config.load(overrides=[f"experiment.runs_dir={root}", f"experiment.name=bench{resolution}",
                                 f"data.resolution={resolution}", f"data.color={color}",
                                 f"data.image_format={image_format}", "data.val_fraction=0"])
    directory = prepare.run(cfg)
    urls = sorted(str(p) for p in directory.glob("train-*.tar"))
    folder = root / f"folder{resolution}"
    folder.mkdir()
    files = []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(f".{image_format}"):
                    path = folder / member.name
                    path.write_bytes(tar.extractfile(member).read())
                    files.append(path)
    return urls, files


def _prepare_arrays(root: Path, count: int, shape: tuple[int, ...]) -> tuple[list[str], list[Path]]:
    rng = np.random.default_rng(0)
    folder = root / "arrays"
    folder.mkdir()
    files = []
    with shards.ShardWriter(root, "latents", max_count=1000, max_bytes=1 << 30) as writer:
        for i in range(count):
            array = rng.standard_normal(shape, dtype=np.float32)
            buffer = io.BytesIO()
            np.save(buffer, array)
            writer.write({"__key__": f"{i:07d}", "npy": buffer.getvalue()})
            files.append(folder / f"{i:07d}.npy")
            np.save(files[-1], array)
    return sorted(str(p) for p in root.glob("latents-*.tar")), files


def _epoch_rate(make_iterable, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(len(next(iter(batch.values())) if isinstance(batch, dict) else batch) for batch in make_iterable())
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--array-count", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [
            ("MNIST 32x32 gray PNG", *_prepare_images(root, 32, "gray", "png")),
            ("MNIST 128x128 RGB JPEG", *_prepare_images(root, 128, "rgb", "jpg")),
            ("latent .npy 4x16x16 fp32", *_prepare_arrays(root, args.array_count, (4, 16, 16))),
        ]
        for name, urls, files in cases:
            baseline_set = FolderArrays(files) if name.startswith("latent") else FolderImages(files)
            for workers in args.workers:
                loader = ShardLoader(urls, batch_size=args.batch_size, num_workers=workers, samples_per_epoch=len(files),
                                     shuffle_buffer=1000, flip=not name.startswith("latent"))
                ours = _epoch_rate(lambda: loader, args.repeats)
                baseline = _epoch_rate(
                    lambda: torch.utils.data.DataLoader(baseline_set, batch_size=args.batch_size, shuffle=True,
                                                        num_workers=workers, drop_last=True),
                    args.repeats)
                rows.append((name, workers, ours, baseline))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s) per process, "
          f"{len(os.sched_getaffinity(0))} cores; torch {torch.__version__}; "
          f"batch {args.batch_size}; median of {args.repeats} epochs\n")
    print("| samples | workers | shards: samples/s | per worker | folder baseline: samples/s | shards / folder |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, workers, ours, baseline in rows:
        print(f"| {name} | {workers} | {ours:,.0f} | {ours / workers:,.0f} | {baseline:,.0f} | {ours / baseline:.2f} |")


if __name__ == "__main__":
    main()
