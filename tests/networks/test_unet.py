"""U-Net invariants: zero-initialised branches are the identity, layout consistency, conditioning."""

import pytest
import torch

from pipeline.networks import build_denoiser
from pipeline.networks.unet import UNET_PRESETS, AttentionBlock, Attn, Res, ResBlock, UNet, UNetConfig, unet_layout

TINY = dict(
    input_size=8,
    model_channels=8,
    channel_mult=(1, 2),
    attention_resolutions=(4,),
    num_head_channels=8,
    norm_groups=4,
    num_res_blocks=1,
)


def test_zero_initialised_blocks_are_the_identity(net_inputs):
    net = UNet(UNetConfig(**TINY, num_classes=2, learn_sigma=True))
    emb = torch.randn(2, net.config.embed_dim)
    checked = 0
    for module in net.modules():
        if isinstance(module, ResBlock):
            x = torch.randn(2, module.conv1.in_channels, 4, 4)
            assert torch.equal(module(x, emb), module.skip(x))
            checked += 1
        elif isinstance(module, AttentionBlock):
            x = torch.randn(2, module.norm.num_channels, 4, 4)
            assert torch.equal(module(x), x)
            checked += 1
    assert checked >= 5
    x, t = net_inputs()
    out = net(x, t, torch.tensor([0, 1, 2]))
    assert out.shape == (3, 8, 8, 8) and not out.any()


@pytest.mark.parametrize("preset", sorted(UNET_PRESETS))
def test_layout_skips_pair_up_and_resolution_returns(preset):
    config = UNetConfig(**UNET_PRESETS[preset])
    layout = unet_layout(config)
    assert len(layout.decoder) == len(layout.encoder) + 1  # one skip per encoder group + the stem
    sizes = [spec.size for group in layout.decoder for spec in group if isinstance(spec, Res)]
    assert sizes[-1] == config.input_size and min(sizes) == config.input_size // 2 ** (len(config.channel_mult) - 1)
    shape = (2, 4, config.input_size, config.input_size)
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        assert UNet(config)(torch.empty(shape), torch.empty(2)).shape == shape


def test_attention_only_at_the_configured_resolutions():
    layout = unet_layout(UNetConfig(**{**TINY, "attention_resolutions": (8,)}))
    encoder_attn = [s.size for g in layout.encoder for s in g if isinstance(s, Attn)]
    assert encoder_attn == [8]


def test_dropout_is_active_in_training_only(randomise, net_inputs):
    net = randomise(UNet(UNetConfig(**TINY, dropout=0.5)))
    x, t = net_inputs()
    net.eval()
    torch.testing.assert_close(net(x, t), net(x, t))
    net.train()
    assert not torch.allclose(net(x, t), net(x, t))


@pytest.mark.gpu
def test_channels_last_on_gpu_matches_contiguous(randomise, net_inputs):
    net = randomise(build_denoiser("unet", **TINY)).cuda()
    x, t = (v.cuda() for v in net_inputs())
    out = net(x, t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    reference = randomise(build_denoiser("unet", **TINY, channels_last=False)).cuda()
    torch.testing.assert_close(out, reference(x, t), atol=1e-4, rtol=1e-4)


def test_channels_last_weights_and_inputs_match_contiguous_on_cpu(randomise, net_inputs):
    """Every op of the U-Net is layout-agnostic: the channels-last path CUDA takes gives the
    same numbers (checked here on the CPU, where the network leaves the layout alone)."""
    net = randomise(build_denoiser("unet", **TINY))
    x, t = net_inputs()
    reference = net(x, t)
    net = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last), t), reference, atol=1e-5, rtol=1e-5)
