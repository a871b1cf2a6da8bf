"""The constructor API: presets, keyword overrides, clear errors, frozen configs."""

import dataclasses

import pytest
import torch

from pipeline.networks import DiT, UNet, build_denoiser, denoiser_config


def test_preset_with_overrides():
    config = denoiser_config("dit", "S/2", in_channels=3, input_size=16, num_classes=10, learn_sigma=True)
    assert (config.width, config.depth, config.num_heads, config.patch_size) == (384, 12, 6, 2)
    assert (config.in_channels, config.input_size, config.out_channels) == (3, 16, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.width = 8  # type: ignore[misc]


def test_build_returns_the_right_network():
    dit = build_denoiser(kind="dit", width=32, depth=1, num_heads=2, input_size=8)
    unet = build_denoiser(
        kind="unet", input_size=8, model_channels=8, channel_mult=(1,), norm_groups=4, attention_resolutions=()
    )
    assert isinstance(dit, DiT) and isinstance(unet, UNet)
    x = torch.randn(2, 4, 8, 8)
    assert dit(x, torch.rand(2)).shape == unet(x, torch.rand(2)).shape == x.shape


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: denoiser_config("vit"), "vit"),
        (lambda: denoiser_config("dit", "S/3"), "S/3"),
        (lambda: denoiser_config("unet", "48x48"), "48x48"),
        (lambda: denoiser_config("dit", "S/2", hidden_size=3), "hidden_size"),
        (lambda: denoiser_config("dit", "S/2", patch_size=3), "patch_size"),
        (lambda: denoiser_config("dit", "S/8", input_size=12), "patch_size"),
        (lambda: denoiser_config("dit", "S/2", attention_backend="flash"), "flash"),
        (lambda: denoiser_config("unet", "64x64", input_size=36), "input_size"),
    ],
)
def test_bad_arguments_name_the_culprit(call, names):
    with pytest.raises(ValueError, match=names):
        call()
