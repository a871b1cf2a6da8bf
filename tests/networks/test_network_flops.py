"""Analytic FLOPs equal torch's FLOP counter on small instances and the DiT paper's table."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.networks import build_denoiser, denoiser_config, forward_flops, mfu, training_flops
from pipeline.networks.dit import DIT_PRESETS
from pipeline.networks.flops import dit_forward_macs

# torch's counter sees the attention matmuls only when they run as plain matmuls (the CPU sdpa
# kernel is not in its registry), so the comparison uses the math backend.
SMALL = {
    "dit-p1": ("dit", dict(width=32, depth=2, num_heads=2, input_size=4, patch_size=1)),
    "dit-p2-classes-sigma": (
        "dit",
        dict(width=32, depth=2, num_heads=2, input_size=8, num_classes=5, learn_sigma=True),
    ),
    "dit-p4-mlp2": ("dit", dict(width=48, depth=1, num_heads=3, input_size=8, patch_size=4, mlp_ratio=2.0)),
    "unet-attention-everywhere": (
        "unet",
        dict(
            input_size=8,
            model_channels=8,
            channel_mult=(1, 2),
            attention_resolutions=(8, 4),
            num_head_channels=4,
            norm_groups=4,
            num_res_blocks=2,
            num_classes=5,
            learn_sigma=True,
        ),
    ),
    "unet-three-levels": (
        "unet",
        dict(
            input_size=8,
            model_channels=8,
            channel_mult=(1, 3, 2),
            attention_resolutions=(2,),
            num_head_channels=8,
            norm_groups=4,
            num_res_blocks=1,
        ),
    ),
}


def counted_forward_flops(kind, options, batch=2):
    net = build_denoiser(kind, **options, attention_backend="math")
    size = net.config.input_size
    y = torch.zeros(batch, dtype=torch.long) if net.null_class is not None else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(batch, 4, size, size), torch.rand(batch), y)
    return counter.get_total_flops() / batch, net.config


@pytest.mark.parametrize("name", SMALL)
def test_analytic_forward_flops_equal_torch_flop_counter(name):
    counted, config = counted_forward_flops(*SMALL[name])
    assert forward_flops(config) == counted


def test_backward_costs_about_two_forwards():
    """The 3 x forward training rule: counted backward is 2 x forward, less the input gradient
    of the first layer, which nothing needs."""
    kind, options = SMALL["dit-p2-classes-sigma"]
    net = build_denoiser(kind, **options, attention_backend="math")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        net(x, t, y).sum().backward()
    assert 0.9 < counter.get_total_flops() / 2 / training_flops(net.config) <= 1.0


# DiT paper, table 4: forward "Gflops" (multiply-adds) at 256 px = 32x32x4 latents.
PAPER_GMACS = {
    "S/8": 0.36,
    "S/4": 1.41,
    "S/2": 6.06,
    "B/8": 1.42,
    "B/4": 5.56,
    "B/2": 23.01,
    "L/8": 5.01,
    "L/4": 19.70,
    "L/2": 80.71,
    "XL/8": 7.39,
    "XL/4": 29.05,
    "XL/2": 118.64,
}


@pytest.mark.parametrize("preset", PAPER_GMACS)
def test_dit_presets_match_the_papers_gflops_as_macs(preset):
    config = denoiser_config("dit", preset, input_size=32, num_classes=1000, learn_sigma=True)
    assert abs(dit_forward_macs(config) / 1e9 / PAPER_GMACS[preset] - 1) < 0.01
    assert forward_flops(config) == 2 * dit_forward_macs(config)


def test_every_preset_has_a_flop_count():
    for preset in DIT_PRESETS:
        assert forward_flops(denoiser_config("dit", preset)) > 0
    for preset in ("8x8", "16x16", "32x32", "64x64"):
        assert forward_flops(denoiser_config("unet", preset)) > 0


def test_training_flops_and_mfu():
    config = denoiser_config("dit", "S/2")
    assert training_flops(config) == 3 * forward_flops(config)
    # 100 samples/s at exactly the peak rate is 100% utilisation
    assert mfu(config, 100.0, training_flops(config) * 100.0) == pytest.approx(1.0)
