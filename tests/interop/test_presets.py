"""The SD-VAE + DiT presets load, are the DiT paper's recipe, and the parameter and FLOP counts
written in their comments are those of the networks they configure."""

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.networks import build_denoiser
from pipeline.networks.flops import forward_flops, training_flops

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SD_VAE_LATENTS = dict(channels=4, resolution=32, num_classes=1000)  # 256 / f8, ImageNet


@pytest.mark.parametrize(
    "name,size", [("imagenet256-sdvae-dit-xl2.yaml", (1152, 28, 16)), ("imagenet256-sdvae-dit-b2.yaml", (768, 12, 12))]
)
def test_preset_is_the_dit_recipe_with_its_counted_numbers(name, size):
    path = CONFIGS / name
    cfg = config.load(path)
    d = cfg.diffusion
    assert cfg.autoencoder.kind == "pretrained" and d.normalize == "checkpoint"
    assert (d.backbone, d.dit.patch_size, (d.dit.width, d.dit.depth, d.dit.num_heads)) == ("dit", 2, size)
    assert (d.learning_rate, d.weight_decay, d.ema_decay, d.mixed_precision) == (1e-4, 0.0, 0.9999, "bf16")
    assert d.class_conditional and d.label_dropout == 0.1 and (d.process, d.prediction) == ("ddpm", "eps")
    network = d.network_config(**SD_VAE_LATENTS)
    with torch.device("meta"):  # counts without allocating 2.7 GB
        parameters = sum(p.numel() for p in build_denoiser("dit", **dataclasses.asdict(network)).parameters())
    comments = path.read_text()
    assert f"{parameters / 1e6:.1f}M parameters ({parameters:,})" in comments
    assert f"{forward_flops(network) / 1e9:.1f} GFLOPs per image forward" in comments
    assert f"{training_flops(network) / 1e9:.1f} GFLOPs per" in comments
