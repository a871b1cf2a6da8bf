"""Messages instead of tracebacks (issue 15, "Why" item 9) for what a user meets first: a small
folder with an empty validation split, and a DiT patch size that does not divide the latent."""

import numpy as np
import pytest
from PIL import Image

from pipeline import config, manifest
from pipeline.diffusion.build import build_network
from stages import prepare


def test_a_small_folder_with_no_validation_image_is_refused_naming_val_fraction(tmp_path):
    for i in range(3):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    cfg = config.load(
        overrides=[
            f"experiment.runs_dir={tmp_path / 'runs'}",
            "data.workers=0",
            "data.source=folder",
            f"data.path={tmp_path / 'imgs'}",
            "data.val_fraction=0.01",
        ]
    )
    with pytest.raises(config.ConfigError, match=r"3 image\(s\) give an empty val split with data.val_fraction=0.01"):
        prepare.run(cfg)
    assert manifest.read(cfg.stage_dir("prepare")) is None  # refused: nothing marked, no shard written
    assert not list(cfg.stage_dir("prepare").glob("*.tar"))


def test_a_dit_patch_size_that_does_not_divide_the_latent_is_a_config_error():
    cfg = config.load(overrides=["diffusion.backbone=dit", "diffusion.dit.patch_size=4"])
    with pytest.raises(config.ConfigError, match="patch_size"):
        build_network(cfg.diffusion, 4, 6, 0)
