"""The harness itself: each stand-in refuses what CUDA refuses, and lets through what CUDA allows."""

import pytest
import torch

from pipeline import seeding


def test_a_cpu_generator_cannot_draw_onto_the_stand_in(stand_in):
    g = torch.Generator().manual_seed(0)
    like = stand_in.tensor(torch.zeros(3))
    draws = [
        lambda: torch.randn(3, generator=g, device=stand_in.device),
        lambda: torch.randint(0, 5, (3,), generator=g, device=stand_in.device),
        lambda: torch.randperm(4, generator=g, device=stand_in.device),
        lambda: torch.randn_like(like, generator=g),
        lambda: torch.bernoulli(like, generator=g),
        lambda: like.clone().normal_(generator=g),
    ]
    with stand_in.running():
        for draw in draws:
            with pytest.raises(RuntimeError, match=f"Expected a '{stand_in.device.type}' device type for generator"):
                draw()


def test_drawing_on_the_generators_device_then_moving_passes(stand_in):
    g = torch.Generator().manual_seed(0)
    with stand_in.running():
        assert seeding.randn((2, 3), g, device=stand_in.device).device == stand_in.device
        assert seeding.randperm(5, g, device=stand_in.device).device == stand_in.device
        assert torch.randn(3, generator=g).device.type == "cpu"  # CPU onto CPU is fine
        assert torch.randn(3, device=stand_in.device).device == stand_in.device  # no generator: fine


def test_the_guard_is_off_outside_running():
    torch.randn(3, generator=torch.Generator(), device="meta")  # what the guard exists to catch


def test_a_cpu_table_meeting_the_stand_in_raises(stand_in):
    x = stand_in.tensor(torch.ones(4))
    with stand_in.running(), pytest.raises(Exception, match="cpu"):
        x + torch.arange(4.0)


def test_meta_runs_backward_and_an_optimiser_step(meta):
    net = meta.module(torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(net.parameters())
    with meta.running():
        net(meta.tensor(torch.randn(4, 3))).square().mean().backward()
        opt.step()
    assert net.weight.device == meta.device


def test_fake_cuda_autocasts_to_bf16(fake_cuda):
    net = fake_cuda.module(torch.nn.Linear(3, 2))
    with fake_cuda.running(), fake_cuda.bf16_autocast():
        out = net(fake_cuda.tensor(torch.randn(4, 3)))
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
