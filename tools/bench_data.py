"""Throughput of the data path, each measurement next to its baseline in the same run.

Readers: the tar reader (pipeline.data.tar) against webdataset's own ``tar_file_iterator``
(tarfile underneath) on the same shard files: members/s and MB/s, median of ``--repeats``
passes over all shards, and the ratio.

Loader: image shards (decode + flip augmentation) and small numeric samples (.npy latents), each
read by ``ShardLoader`` from WebDataset shards and by a map-style ``Dataset`` over a folder
holding the same samples as individual files: median of ``--repeats`` epochs, samples/s in total
and per worker, and the shard/folder ratio. Prints Markdown tables.

    python tools/bench_data.py --workers 1 2 --repeats 3
    python tools/bench_data.py --part readers --repeats 7
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import tar_file_iterator

from pipeline import config
from pipeline.data import shards, tar
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
    cfg = config.load(
        overrides=[
            f"experiment.runs_dir={root}",
            f"experiment.name=bench{resolution}",
            f"data.resolution={resolution}",
            f"data.color={color}",
            f"data.image_format={image_format}",
            "data.val_fraction=0",
        ]
    )
    directory = prepare.run(cfg)
    urls = sorted(str(p) for p in directory.glob("train-*.tar"))
    folder = root / f"folder{resolution}"
    folder.mkdir()
    files = []
    for url in urls:
        with open(url, "rb") as handle:
            for name, data in tar.members(handle):
                if name.endswith(f".{image_format}"):
                    path = folder / name
                    path.write_bytes(data)
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


def _epoch_rate(make_iterable: Callable[[], Iterable], repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(len(next(iter(batch.values())) if isinstance(batch, dict) else batch) for batch in make_iterable())
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def _reader_rates(urls: list[str], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (members/s, MB/s) of one pass over all shards, per reader, interleaved per repeat so
    that machine load drifts hit both alike."""

    def ours(handle):
        return ((name, data) for name, data in tar.members(handle))

    def webdataset(handle):
        return ((member["fname"], member["data"]) for member in tar_file_iterator(handle))

    readers = {"pipeline.data.tar": ours, "webdataset tar_file_iterator": webdataset}
    times: dict[str, list[float]] = {name: [] for name in readers}
    members = size = 0
    for _ in range(repeats):
        for name, read in readers.items():
            members = size = 0
            start = time.perf_counter()
            for url in urls:
                with open(url, "rb") as handle:
                    for _, data in read(handle):
                        members += 1
                        size += len(data)
            times[name].append(time.perf_counter() - start)
    return {name: (members / statistics.median(t), size / 1e6 / statistics.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--array-count", type=int, default=20000)
    parser.add_argument("--part", choices=["readers", "loader", "all"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows, reader_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [
            ("MNIST 32x32 gray PNG", *_prepare_images(root, 32, "gray", "png")),
            ("MNIST 128x128 RGB JPEG", *_prepare_images(root, 128, "rgb", "jpg")),
            ("latent .npy 4x16x16 fp32", *_prepare_arrays(root, args.array_count, (4, 16, 16))),
        ]
        for name, urls, files in cases:
            if args.part != "loader":
                rates = _reader_rates(urls, args.repeats)
                reader_rows.append((name, sum(os.path.getsize(u) for u in urls), rates))
            if args.part == "readers":
                continue
            baseline_set = FolderArrays(files) if name.startswith("latent") else FolderImages(files)
            for workers in args.workers:
                loader = ShardLoader(
                    urls,
                    batch_size=args.batch_size,
                    num_workers=workers,
                    samples_per_epoch=len(files),
                    shuffle_buffer=1000,
                    flip=not name.startswith("latent"),
                )
                ours = _epoch_rate(functools.partial(iter, loader), args.repeats)
                baseline = _epoch_rate(
                    functools.partial(
                        torch.utils.data.DataLoader,
                        baseline_set,
                        batch_size=args.batch_size,
                        shuffle=True,
                        num_workers=workers,
                        drop_last=True,
                    ),
                    args.repeats,
                )
                rows.append((name, workers, ours, baseline))

    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s) per process, "
        f"{len(os.sched_getaffinity(0))} cores; torch {torch.__version__}; "
        f"batch {args.batch_size}; median of {args.repeats} passes/epochs\n"
    )
    if reader_rows:
        print("| shards | MB | reader | members/s | MB/s | ours / webdataset |")
        print("|---|---:|---|---:|---:|---:|")
        for name, total, rates in reader_rows:
            ratio = rates["pipeline.data.tar"][0] / rates["webdataset tar_file_iterator"][0]
            for reader, (members, mb) in rates.items():
                print(f"| {name} | {total / 1e6:.1f} | {reader} | {members:,.0f} | {mb:,.1f} | {ratio:.2f} |")
        print()
    if not rows:
        return
    print("| samples | workers | shards: samples/s | per worker | folder baseline: samples/s | shards / folder |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, workers, ours, baseline in rows:
        print(f"| {name} | {workers} | {ours:,.0f} | {ours / workers:,.0f} | {baseline:,.0f} | {ours / baseline:.2f} |")


if __name__ == "__main__":
    main()
