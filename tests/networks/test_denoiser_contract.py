"""The contract every backbone keeps (``net(x, t, y=None)``), checked on DiT and U-Net alike."""

import pytest
import torch

from pipeline.networks import build_denoiser

TINY = {
    "dit": dict(width=32, depth=2, num_heads=2, input_size=8, in_channels=4),
    "unet": dict(
        input_size=8,
        model_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(4,),
        num_head_channels=8,
        norm_groups=4,
        num_res_blocks=1,
    ),
}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_samples_do_not_interact_within_a_batch(kind, randomise, net_inputs):
    net = randomise(build_denoiser(kind, **TINY[kind], num_classes=3))
    x, t = net_inputs(batch=4)
    y = torch.tensor([0, 1, 2, 3])
    whole = net(x, t, y)
    for i in range(4):
        torch.testing.assert_close(net(x[i : i + 1], t[i : i + 1], y[i : i + 1]), whole[i : i + 1])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_conditioning_and_time_contract(kind, randomise, net_inputs):
    net = randomise(build_denoiser(kind, **TINY[kind], num_classes=3))
    x, t = net_inputs()
    assert net.null_class == 3
    null = torch.full((3,), 3)
    torch.testing.assert_close(net(x, t), net(x, t, null))  # y=None means the null class
    assert not torch.allclose(net(x, t, torch.tensor([0, 1, 2])), net(x, t, null))
    torch.testing.assert_close(net(x, t[:1].expand(3)), net(x, t[0]))  # a scalar time broadcasts
    with pytest.raises(ValueError, match="unconditional"):
        build_denoiser(kind, **TINY[kind])(x, t, null)
