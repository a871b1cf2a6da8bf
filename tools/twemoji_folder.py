"""Lay out the Twemoji set (npm ``emoji-datasource-twitter``) as a labelled image folder.

The colour benchmark of configs/color32.yaml (docs/benchmarks.md, "Colour presets"):

    npm pack emoji-datasource-twitter@16.0.0 && tar xzf emoji-datasource-twitter-16.0.0.tgz
    python tools/twemoji_folder.py package /data/twemoji
    latentpipe run --config configs/color32.yaml data.path=/data/twemoji

Every 64x64 RGBA image of ``img/twitter/64/`` (base emoji and skin-tone variants) is linked into
``<out>/<category>/``, the category coming from ``emoji.json``; prepare composites the
transparency onto ``data.background``. The 5 "Component" images (skin-tone swatches and hair
parts, not emoji) are left out, so 9 classes remain.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

LEFT_OUT = {"Component"}


def images_by_category(package: Path) -> dict[str, list[str]]:
    """Category name -> image file names (the base emoji and its skin-tone variants)."""
    emoji = json.loads((package / "emoji.json").read_text())
    categories: dict[str, list[str]] = {}
    for entry in emoji:
        if entry["category"] in LEFT_OUT:
            continue
        variants = [entry, *entry.get("skin_variations", {}).values()]
        names = [v["image"] for v in variants if v.get("has_img_twitter")]
        categories.setdefault(entry["category"], []).extend(names)
    return categories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="the unpacked npm package (holds emoji.json)")
    parser.add_argument("out", type=Path, help="the image folder to create (one sub-folder per category)")
    args = parser.parse_args()
    images = args.package.resolve() / "img" / "twitter" / "64"
    total = 0
    for category, names in sorted(images_by_category(args.package).items()):
        folder = args.out / category.replace(" & ", "-and-").replace(" ", "-").lower()
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            link = folder / name
            if not link.exists():
                os.symlink(images / name, link)
        total += len(names)
        print(f"{folder.name:<20} {len(names):>5}")
    print(f"{total} images in {args.out}")


if __name__ == "__main__":
    main()
