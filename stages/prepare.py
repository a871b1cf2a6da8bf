"""Stage `prepare`: images -> WebDataset shards ``{train,val}-%06d.tar``.

Reads the configured source, normalises every image (colour mode, transparency, size) and
writes shards with ``png|jpg|webp`` + ``cls`` + ``json`` per sample. Unreadable images are
skipped and listed in the manifest (or stop the stage with ``data.on_error=raise``).

Resumable: after each shard is published, ``progress.json`` records how far each split got,
so a rerun with the same config continues after the last complete shard; a rerun with a
different config starts over cleanly.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from pipeline import artifacts, atomic, config, manifest, stage_registry
from pipeline.data import shards, sources, transforms
from pipeline.errors import LatentpipeError
from pipeline.seeding import uniform_fraction

SPEC = stage_registry.get("prepare")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs
SPLITS = ("train", "val")
PROGRESS = "progress.json"

log = logging.getLogger(__name__)


class PrepareError(LatentpipeError):
    """An image could not be read and ``data.on_error=raise``."""


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic split by key hash: independent of source order and of the worker count."""
    return "val" if uniform_fraction("val-split", key) < val_fraction else "train"


def convert(item: sources.SourceItem, data: config.DataConfig) -> tuple[dict | None, str | None]:
    """One source item -> (shard sample, None) or (None, error message). Runs in workers."""
    try:
        image = sources.load_image(item, data.url_timeout)
        meta = {"source": item.origin, "original_size": list(image.size), "original_mode": image.mode}
        image = transforms.to_color(image, data.color, data.background)
        image = transforms.to_square(image, data.resolution, data.resize, data.background)
        encoded = shards.encode_image(image, data.image_format, data.quality)
    except Exception as err:  # any decoder failure is a property of that one file
        return None, f"{type(err).__name__}: {err}"
    return shards.make_sample(item.key, encoded, data.image_format, item.label, meta), None


class _Converter:
    """Picklable ``convert`` bound to the data config, for the worker pool."""

    def __init__(self, data: config.DataConfig):
        self.data = data

    def __call__(self, item: sources.SourceItem):
        return convert(item, self.data)


def _load_progress(directory: Path, config_hash: str) -> dict:
    """Progress of an earlier interrupted run with the same config; otherwise a clean slate."""
    path = directory / PROGRESS
    previous = json.loads(path.read_text()) if path.is_file() else None
    fresh = {"config_hash": config_hash, "splits": {s: {"next_item": 0, "shards": [], "skipped": []} for s in SPLITS}}
    progress = previous if previous and previous.get("config_hash") == config_hash else fresh
    kept = {s["name"] for split in progress["splits"].values() for s in split["shards"]}
    for stale in list(directory.glob("*.tar")) + list(directory.glob(f".*{atomic.TMP_SUFFIX}")):
        if stale.name not in kept:
            stale.unlink()
    if progress is previous:
        log.info(
            "prepare: continuing an interrupted run (%s)",
            ", ".join(f"{s}: {len(v['shards'])} shards" for s, v in progress["splits"].items()),
        )
    return progress


def _write_split(split: str, items: list, data: config.DataConfig, directory: Path, progress: dict, pool) -> None:
    state = progress["splits"][split]
    start = state["next_item"]
    written_upto = start  # items before this position are in published shards or skipped

    def published(info: shards.ShardInfo) -> None:
        state["shards"].append(asdict(info))
        state["next_item"] = written_upto
        state["skipped"] = [s for s in state["skipped"] if s["position"] < written_upto]
        atomic.write_text(directory / PROGRESS, json.dumps(progress))

    writer = shards.ShardWriter(
        directory,
        split,
        max_count=data.shard_max_count,
        max_bytes=data.shard_max_bytes,
        first_index=len(state["shards"]),
        on_shard=published,
    )
    results = pool.imap(_Converter(data), items[start:], chunksize=8) if pool else map(_Converter(data), items[start:])
    with (
        writer,
        tqdm(total=len(items), initial=start, desc=f"prepare {split}", unit="img", leave=False, disable=None) as bar,
    ):
        for position, (item, (sample, error)) in enumerate(zip(items[start:], results), start):
            bar.update()
            if error is not None:
                if data.on_error == "raise":
                    raise PrepareError(f"cannot read {item.origin}: {error} (data.on_error=skip skips such files)")
                log.warning("prepare: skipping %s (%s)", item.origin, error)
                state["skipped"].append({"position": position, "key": item.key, "source": item.origin, "error": error})
                continue
            written_upto = position  # a shard published by this write holds items < position
            writer.write(sample)
        written_upto = len(items)
    if state["next_item"] != len(items):  # the items after the last shard were all skipped
        state["next_item"] = len(items)
        atomic.write_text(directory / PROGRESS, json.dumps(progress))


def _warn_empty_classes(
    classes: list[str], summary: dict[str, artifacts.SplitSummary], data: config.DataConfig
) -> None:
    """A class with no image in a split is still a class the model is conditioned on (and that
    sample draws), so say so: it happens with a small data.limit or data.val_fraction."""
    for split, found in summary.items():
        empty = [name for name in classes if not found.class_counts.get(name)]
        if empty and found.count:
            log.warning(
                "prepare: %d of %d classes have no %s images (data.limit=%s, data.val_fraction=%s): %s",
                len(empty),
                len(classes),
                split,
                data.limit,
                data.val_fraction,
                ", ".join(empty[:10]) + (", ..." if len(empty) > 10 else ""),
            )


def run(cfg: config.Config) -> Path:
    data = cfg.data
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS) as record:
        directory = record.directory
        source = sources.open_source(data)
        # Shards in a fixed pseudo-random order (by key hash): sources often list images class by
        # class, and a streaming shuffle buffer cannot mix shards that each hold one or two classes.
        ordered = sorted(source.items, key=lambda item: uniform_fraction("shard-order", item.key))
        by_split = {s: [i for i in ordered if split_of(i.key, data.val_fraction) == s] for s in SPLITS}
        if empty := [s for s in SPLITS if not by_split[s]]:  # the autoencoder would fail only after training
            raise config.ConfigError(
                f"data: {len(ordered)} image(s) give an empty {' and '.join(empty)} split with data.val_fraction="
                f"{data.val_fraction}: add images or change data.val_fraction"
            )
        progress = _load_progress(directory, config.section_hash(cfg, SECTIONS))
        pool = multiprocessing.get_context("fork").Pool(data.workers) if data.workers > 1 else None
        try:
            with atomic.disk_full_as_error("shards", directory):
                for split in SPLITS:
                    _write_split(split, by_split[split], data, directory, progress, pool)
        finally:
            if pool is not None:
                pool.terminate()
        summary = {}
        for split in SPLITS:
            state = progress["splits"][split]
            for shard in state["shards"]:
                record.add_output(directory / shard["name"], split=split, count=shard["count"])
            skipped_keys = {s["key"] for s in state["skipped"]}
            labels = Counter(i.label for i in by_split[split] if i.key not in skipped_keys and i.label is not None)
            summary[split] = artifacts.SplitSummary(
                count=sum(s["count"] for s in state["shards"]),
                shards=tuple(s["name"] for s in state["shards"]),
                class_counts={source.classes[k]: labels[k] for k in sorted(labels)},
            )
        _warn_empty_classes(source.classes, summary, data)
        skipped = [s for split in SPLITS for s in progress["splits"][split]["skipped"]]
        if skipped:
            log.warning("prepare: skipped %d unreadable image(s); they are listed in the manifest", len(skipped))
        record.metrics.update({f"{s}_count": summary[s].count for s in SPLITS}, skipped=len(skipped))
        record.publish(
            artifacts.PreparedShards(
                directory=directory,
                splits=summary,
                classes=tuple(source.classes),
                skipped=tuple(skipped),
                image=artifacts.ImageSpec(
                    resolution=data.resolution, channels=1 if data.color == "gray" else 3, format=data.image_format
                ),
            )
        )
        (directory / PROGRESS).unlink()
    return directory
