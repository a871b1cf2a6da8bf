"""Training options change how the networks run, never what they compute."""

import shutil

import pytest
import torch

from pipeline.networks import build_denoiser

TINY_DIT = dict(width=32, depth=3, num_heads=2, input_size=8, patch_size=2, num_classes=3, learn_sigma=True)
TINY_UNET = dict(
    input_size=8,
    model_channels=8,
    channel_mult=(1, 2),
    attention_resolutions=(4,),
    num_head_channels=8,
    norm_groups=4,
    num_res_blocks=1,
    num_classes=3,
)
CASES = {
    "dit": dict(TINY_DIT, drop_path=0.2),  # stochastic depth: the recomputation must redraw the same
    "unet": dict(TINY_UNET, dropout=0.3),  # dropout masks for the gradients to match
}


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, 8, 8, generator=gen), torch.rand(4, generator=gen) * 100, torch.tensor([0, 1, 2, 3])


def gradients(net, seed=2):
    net.zero_grad()
    x, t, y = batch()
    torch.manual_seed(seed)
    net(x, t, y).square().mean().backward()
    return {name: p.grad.clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("kind", CASES)
def test_gradient_checkpointing_gives_identical_gradients(kind, randomise):
    net = randomise(build_denoiser(kind, **CASES[kind])).train()
    plain = gradients(net)
    net.gradient_checkpointing = True
    checkpointed = gradients(net)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", CASES)
def test_checkpointing_is_a_config_option(kind):
    net = build_denoiser(kind, **CASES[kind], gradient_checkpointing=True)
    assert net.gradient_checkpointing
    with torch.no_grad():  # no recomputation bookkeeping in inference
        net(*batch())


@pytest.mark.parametrize("kind", CASES)
def test_torch_compile_captures_one_graph(kind, randomise):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without codegen."""
    net = randomise(build_denoiser(kind, **CASES[kind])).train()
    x, t, y = batch()
    torch.manual_seed(3)
    eager = net(x, t, y)
    torch.manual_seed(3)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)(x, t, y)
    torch.testing.assert_close(compiled, eager)
    compiled.square().mean().backward()


HAS_CXX = any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_inductor_compiled_dit_matches_eager(randomise):
    """Generated CPU kernels compute the same function (one block keeps the cold compile ~20 s)."""
    net = randomise(build_denoiser("dit", **{**TINY_DIT, "depth": 1})).eval()
    x, t, y = batch()
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x, t, y), net(x, t, y), atol=1e-4, rtol=1e-4)
