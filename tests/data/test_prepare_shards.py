"""Shard writing through the prepare stage: round trip, bad files, interruption."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import config, manifest
from pipeline.data import shards
from pipeline.data.inspect import inspect
from pipeline.data.reader import decode_sample, read_shard
from pipeline.data.remote import expand_urls
from stages import prepare

BACKGROUND = (10, 200, 30)


def _folder_dataset(root, per_class=6):
    """Two classes of small images in awkward modes: RGBA, LA, palette+transparency, 16-bit, RGB."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (12 + i, 9, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"rgb{i}.png")
    transparent = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(transparent, "RGBA").save(root / "cat" / "clear.png")
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(root / "dog" / "deep.png")
    Image.new("LA", (5, 7), (40, 0)).save(root / "dog" / "la.png")
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / "cat" / "wide.jpg")


def _cfg(tmp_path, *overrides):
    return config.load(overrides=[f"experiment.runs_dir={tmp_path / 'runs'}", "data.workers=0", *overrides])


def _samples(directory, split):
    return [s for url in expand_urls(str(directory / f"{split}-*.tar")) for s in read_shard(url, 5)]


def test_folder_round_trip_images_labels_and_metadata(tmp_path):
    _folder_dataset(tmp_path / "imgs")
    cfg = _cfg(
        tmp_path,
        "data.source=folder",
        f"data.path={tmp_path / 'imgs'}",
        "data.labels_from_subfolders=true",
        "data.color=rgb",
        "data.resolution=8",
        f"data.background={list(BACKGROUND)}",
        "data.val_fraction=0.3",
        "data.shard_max_count=4",
    )
    out = prepare.run(cfg)
    found = manifest.read(out)
    assert found["classes"] == ["cat", "dog"]
    samples = _samples(out, "train") + _samples(out, "val")
    assert len(samples) == 16 == found["metrics"]["train_count"] + found["metrics"]["val_count"]
    assert found["metrics"]["val_count"] > 0 and all(o["count"] <= 4 for o in found["outputs"])
    by_source = {json.loads(s["json"])["source"].split("imgs/")[1]: s for s in samples}
    for name, sample in by_source.items():
        decoded = decode_sample(sample)
        assert decoded["image"].shape == (3, 8, 8)
        assert decoded["label"] == (0 if name.startswith("cat") else 1)
    clear = decode_sample(by_source["cat/clear.png"])["image"]
    expected = (np.array(BACKGROUND) / 127.5 - 1).reshape(3, 1, 1)
    assert np.allclose(clear.numpy(), expected, atol=1e-6), "transparent pixels show the background"
    meta = json.loads(by_source["dog/deep.png"]["json"])
    assert meta["original_mode"].startswith("I") and meta["original_size"] == [8, 8]
    deep = np.asarray(Image.open(io.BytesIO(by_source["dog/deep.png"]["png"])))
    assert deep.max() > 200 and deep.min() == 0, "16-bit range is rescaled, not clipped"
    wide = decode_sample(by_source["cat/wide.jpg"])["image"]
    assert wide[0].mean() > 0.9 and wide[1].mean() < -0.9  # red stays red through the center crop


def test_gray_pad_policy_and_builtin_digits(tmp_path):
    cfg = _cfg(tmp_path, "data.source=digits", "data.limit=50", "data.resolution=16", "data.resize=pad")
    out = prepare.run(cfg)
    sample = decode_sample(_samples(out, "train")[0])
    assert sample["image"].shape == (1, 16, 16) and 0 <= sample["label"] < 10
    report = inspect(str(out / "*.tar"), sheet=tmp_path / "sheet.png")
    assert report["total"] == 50 and report["image_sizes"] == {"16x16 L": 50}
    assert sum(report["classes"].values()) == 50
    assert Image.open(tmp_path / "sheet.png").size[0] > 16


def test_corrupt_files_are_skipped_counted_and_listed(tmp_path):
    _folder_dataset(tmp_path / "imgs", per_class=2)
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "imgs" / "dog" / "empty.jpg").write_bytes(b"")
    # 10 images: a val_fraction that gives both splits images (an empty split is refused)
    cfg = _cfg(tmp_path, "data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.val_fraction=0.5")
    found = manifest.read(prepare.run(cfg))
    assert found["metrics"]["skipped"] == 2
    assert sorted(s["source"].rsplit("/", 1)[1] for s in found["skipped"]) == ["broken.png", "empty.jpg"]
    assert found["metrics"]["train_count"] + found["metrics"]["val_count"] == 8

    strict = _cfg(
        tmp_path,
        "data.source=folder",
        f"data.path={tmp_path / 'imgs'}",
        "data.on_error=raise",
        "data.val_fraction=0.5",
        "experiment.name=strict",
    )
    with pytest.raises(prepare.PrepareError, match="broken.png|empty.jpg"):
        prepare.run(strict)
    assert manifest.read(strict.stage_dir("prepare"))["status"] == "failed"


def _shard_keys(directory):
    return {p.name: [s["__key__"] for s in read_shard(str(p), 5)] for p in sorted(directory.glob("*.tar"))}


def test_interrupted_prepare_leaves_no_partial_shard_and_continues(tmp_path, monkeypatch):
    overrides = ["data.source=digits", "data.limit=120", "data.resolution=8", "data.shard_max_count=10"]
    reference = prepare.run(_cfg(tmp_path / "ref", *overrides))

    calls = {"n": 0}
    real_convert = prepare.convert

    def crashing_convert(item, data):
        calls["n"] += 1
        if calls["n"] == 47:
            raise KeyboardInterrupt  # e.g. the job is killed mid-shard
        return real_convert(item, data)

    monkeypatch.setattr(prepare, "convert", crashing_convert)
    cfg = _cfg(tmp_path, *overrides)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(cfg)
    directory = cfg.stage_dir("prepare")
    published = sorted(directory.glob("*.tar"))
    assert len(published) == 4 and not list(directory.glob(".*.tmp"))
    for shard in published:  # every final-named shard is a complete tar
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) == 3 * 10
    assert manifest.read(directory)["status"] == "interrupted"  # Ctrl-C: rerunning continues

    monkeypatch.setattr(prepare, "convert", real_convert)
    calls["n"] = 0
    prepare.run(cfg)
    assert _shard_keys(directory) == _shard_keys(reference)


def test_writer_rolls_over_by_bytes(tmp_path):
    with shards.ShardWriter(tmp_path, "train", max_count=100, max_bytes=1 << 16) as writer:
        for i in range(10):
            writer.write({"__key__": f"k{i}", "npy": b"x" * 20000})
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("train-*.tar"))]
    assert len(sizes) > 1 and all(s <= (1 << 16) + 2 * 10240 for s in sizes)


def test_list_source_reads_paths_and_urls_and_skips_unreachable_ones(tmp_path):
    import functools
    import http.server
    import threading

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (80 * i, 0, 0)).save(images / f"local{i}.png")
    served = tmp_path / "served"
    served.mkdir()
    Image.new("L", (12, 12), 200).save(served / "remote.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        listing = tmp_path / "list.txt"
        listing.write_text(
            "# comment\nimgs/local0.png\nimgs/local1.png\n\n"
            f"{images / 'local2.png'}\nhttp://127.0.0.1:{port}/remote.png\n"
            f"http://127.0.0.1:{port}/missing.png\n"
        )
        cfg = _cfg(tmp_path, "data.source=list", f"data.path={listing}", "data.resolution=8", "data.url_timeout=5")
        found = manifest.read(prepare.run(cfg))
    finally:
        server.shutdown()
    assert found["metrics"]["train_count"] + found["metrics"]["val_count"] == 4
    (skipped,) = found["skipped"]
    assert skipped["source"].endswith("/missing.png") and "cannot reach" in skipped["error"]
    sources = {
        json.loads(s["json"])["source"] for split in ("train", "val") for s in _samples(cfg.stage_dir("prepare"), split)
    }
    assert f"http://127.0.0.1:{port}/remote.png" in sources and str(images / "local2.png") in sources


def test_shards_are_not_in_source_order(tmp_path):
    # scikit-learn's digits, like many folders, come class after class; the shards must mix them
    # so that a streaming shuffle buffer sees every class
    cfg = config.load(
        overrides=[
            f"experiment.runs_dir={tmp_path}",
            "data.source=digits",
            "data.resolution=8",
            "data.shard_max_count=100",
            "data.workers=0",
        ]
    )
    prepare.run(cfg)
    first = sorted(cfg.stage_dir("prepare").glob("train-*.tar"))[0]
    labels = [int(sample["cls"]) for sample in read_shard(str(first), 5)]
    assert len(labels) == 100 and len(set(labels)) == 10
