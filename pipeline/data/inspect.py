"""``latentpipe data inspect``: what is in a shard set, at a glance."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.utils
from PIL import Image

from pipeline.data.reader import IMAGE_FIELDS, read_shard
from pipeline.data.remote import expand_urls
from pipeline.data.transforms import image_to_tensor


def inspect(
    spec: str | Sequence[str], *, sheet: Path | None = None, sheet_size: int = 64, timeout: float = 30.0
) -> dict:
    """Per-shard sample counts, class histogram, image sizes/modes, field names; optionally a
    PNG contact sheet of the first ``sheet_size`` images."""
    shards: dict[str, int] = {}
    classes: Counter[int] = Counter()
    sizes: Counter[str] = Counter()
    fields: Counter[str] = Counter()
    thumbnails: list[torch.Tensor] = []
    for url in expand_urls(spec):
        count = 0
        for sample in read_shard(url, timeout):
            count += 1
            fields.update(k for k in sample if not k.startswith("__"))
            if "cls" in sample:
                classes[int(sample["cls"])] += 1
            image_field = next((f for f in IMAGE_FIELDS if f in sample), None)
            if image_field is not None:
                image = Image.open(io.BytesIO(sample[image_field]))
                sizes[f"{image.width}x{image.height} {image.mode}"] += 1
                if sheet is not None and len(thumbnails) < sheet_size:
                    thumbnails.append(image_to_tensor(image.convert("RGB")))
        shards[url] = count
    if sheet is not None and thumbnails:
        side = max(t.shape[-1] for t in thumbnails)
        thumbnails = [torch.nn.functional.interpolate(t[None], size=(side, side))[0] for t in thumbnails]
        grid = torchvision.utils.make_grid(
            torch.stack(thumbnails), nrow=8, padding=2, normalize=True, value_range=(-1, 1)
        )
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, sheet)
    return {
        "shards": shards,
        "total": sum(shards.values()),
        "classes": dict(sorted(classes.items())),
        "image_sizes": dict(sizes.most_common()),
        "fields": dict(fields.most_common()),
    }
