"""DiT invariants: adaLN-Zero identity at init, patchify/unpatchify, conditioning, paper sizes."""

import pytest
import torch

from pipeline.networks import build_denoiser
from pipeline.networks.dit import DIT_PRESETS, DiT, DiTBlock, DiTConfig
from pipeline.networks.embeddings import sincos_pos_embed_2d

TINY = dict(width=32, depth=2, num_heads=2, input_size=8, in_channels=4)


def test_adaln_zero_block_is_the_identity_at_initialisation():
    net = DiT(DiTConfig(**TINY))
    tokens = torch.randn(2, net.config.num_tokens, 32)
    c = torch.randn(2, 32)
    for block in net.blocks:
        assert isinstance(block, DiTBlock)
        assert torch.equal(block(tokens, c), tokens)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_network_outputs_zero_at_initialisation(learn_sigma, net_inputs):
    net = DiT(DiTConfig(**TINY, num_classes=5, learn_sigma=learn_sigma))
    x, t = net_inputs()
    out = net(x, t, torch.tensor([0, 4, 5]))
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert not out.any()


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_unpatchify_inverts_row_major_patches(patch_size):
    net = DiT(DiTConfig(**{**TINY, "input_size": 16}, patch_size=patch_size))
    x = torch.randn(2, 4, 16, 16)
    p, g = patch_size, 16 // patch_size
    # token (i, j) holds pixels (c, i*p + u, j*p + v) in (u, v, c) order, as the final linear emits them
    tokens = x.reshape(2, 4, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 4)
    assert torch.equal(net.unpatchify(tokens), x)


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_forward_shapes_for_every_patch_size(patch_size, randomise, net_inputs):
    net = randomise(DiT(DiTConfig(**TINY, patch_size=patch_size, learn_sigma=True)))
    x, t = net_inputs()
    assert net(x, t).shape == (3, 8, 8, 8)


def test_position_embedding_is_fixed_sincos():
    net = DiT(DiTConfig(**TINY, patch_size=2))
    assert "pos_embed" not in dict(net.named_parameters())
    pos = sincos_pos_embed_2d(32, 4, 4).reshape(4, 4, 32)
    torch.testing.assert_close(net.pos_embed.reshape(4, 4, 32), pos)
    # the first half encodes the column only, the second half the row only
    assert torch.equal(pos[0, :, :16], pos[3, :, :16]) and torch.equal(pos[:, 0, 16:], pos[:, 3, 16:])
    assert pos.reshape(16, 32).unique(dim=0).shape[0] == 16  # every position distinct


# DiT paper, table 1 / fig. 2 parameter counts (ImageNet 256: 32x32x4 latents, 1000 classes, learned sigma).
PAPER_PARAMETERS = {"S/2": 33e6, "B/2": 130e6, "L/2": 458e6, "XL/2": 675e6}


@pytest.mark.parametrize("preset", PAPER_PARAMETERS)
def test_preset_parameter_counts_match_the_paper(preset):
    with torch.device("meta"):
        net = build_denoiser("dit", preset, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / PAPER_PARAMETERS[preset] - 1) < 0.01


@pytest.mark.parametrize("preset", sorted(DIT_PRESETS))
def test_every_preset_builds_and_runs_on_a_32x32_latent(preset):
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        net = build_denoiser("dit", preset, input_size=32, num_classes=10, learn_sigma=True)
        out = net(torch.empty(2, 4, 32, 32), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 32, 32)
