"""prepare warns when a class ends with no images in a split (the model is still conditioned on
it), naming the class and the settings that caused it; a folder where every class has images in
both splits gets no such warning."""

import logging

from PIL import Image

from pipeline import config, manifest
from stages import prepare


def _folder(root, counts: dict[str, int]):
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), color=(i * 37) % 256).save(root / name / f"{name}-{i}.png")
    return root


def _prepare(tmp_path, folder, caplog):
    cfg = config.load(
        None,
        [
            f"experiment.runs_dir={tmp_path / 'runs'}",
            "data.source=folder",
            f"data.path={folder}",
            "data.labels_from_subfolders=true",
            "data.resolution=8",
            "data.workers=0",
            "data.val_fraction=0.3",
        ],
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.prepare"):
        out = prepare.run(cfg)
    return manifest.read(out), [r.getMessage() for r in caplog.records if "have no" in r.getMessage()]


def test_a_class_missing_from_a_split_is_named(tmp_path, caplog):
    found, warnings = _prepare(tmp_path, _folder(tmp_path / "images", {"many": 30, "other": 30, "single": 1}), caplog)
    missing = [s for s in ("train", "val") if not found["splits"][s]["class_counts"].get("single")]
    assert len(missing) == 1  # its one image is in exactly one split
    assert len(warnings) == 1
    assert f"1 of 3 classes have no {missing[0]} images" in warnings[0]
    assert "data.val_fraction=0.3" in warnings[0] and warnings[0].endswith(": single")


def test_no_warning_when_every_class_is_in_both_splits(tmp_path, caplog):
    found, warnings = _prepare(tmp_path, _folder(tmp_path / "images", {"a": 30, "b": 30}), caplog)
    assert all(found["splits"][s]["class_counts"].keys() == {"a", "b"} for s in ("train", "val"))
    assert warnings == []
