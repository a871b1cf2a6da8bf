"""AdamW construction, the warm-up + decay schedules, resuming a schedule, scaling the rate."""

import io
import math

import pytest
import torch

from pipeline.runtime.optim import build_optimizer, lr_factor, lr_schedule, scale_learning_rate


def _optimizer(lr=1e-3, fused=None):
    return build_optimizer(torch.nn.Linear(3, 2).parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=fused)


def _lrs(optimizer, scheduler, steps):
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_build_optimizer():
    optimizer = _optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"]  # torch has a fused CPU AdamW
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99) and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert not _optimizer(fused=False).defaults["fused"]
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen.parameters(), lr=1.0, betas=(0.9, 0.9), weight_decay=0.0)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_and_unfused_agree(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    ours = build_optimizer(model.parameters(), lr=0.1, betas=(0.9, 0.999), weight_decay=0.1, fused=fused)
    theirs = torch.optim.AdamW(reference.parameters(), lr=0.1, betas=(0.9, 0.999), weight_decay=0.1, foreach=False)
    x = torch.randn(8, 4)
    for _ in range(3):
        for net, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_schedule_shapes():
    base = 2.0
    optimizer = _optimizer(lr=base)
    cosine = _lrs(
        optimizer, lr_schedule(optimizer, warmup_steps=4, total_steps=14, kind="cosine", min_lr_ratio=0.1), 16
    )
    assert cosine[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # the first step already moves
    assert cosine[4 + 5] == pytest.approx(base * (0.1 + 0.9 * 0.5))  # half-way: the mean of max and min
    assert cosine[14:] == pytest.approx([0.2, 0.2])  # stays at the floor after total_steps
    assert all(a >= b for a, b in zip(cosine[3:], cosine[4:]))
    optimizer = _optimizer(lr=base)
    linear = _lrs(optimizer, lr_schedule(optimizer, warmup_steps=0, total_steps=10, kind="linear"), 11)
    assert linear == pytest.approx([base * (1 - s / 10) for s in range(11)])
    optimizer = _optimizer(lr=base)
    assert _lrs(optimizer, lr_schedule(optimizer, warmup_steps=2, total_steps=5, kind="constant"), 5) == pytest.approx(
        [1.0, 2.0, 2.0, 2.0, 2.0]
    )
    assert lr_factor(3, warmup_steps=0, total_steps=6, kind="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 2))
    )
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_schedule(optimizer, warmup_steps=0, total_steps=5, kind="step")


def test_schedule_resumes():
    optimizer = _optimizer()
    scheduler = lr_schedule(optimizer, warmup_steps=3, total_steps=20, kind="cosine")
    straight = _lrs(optimizer, scheduler, 12)

    optimizer = _optimizer()
    scheduler = lr_schedule(optimizer, warmup_steps=3, total_steps=20, kind="cosine")
    first = _lrs(optimizer, scheduler, 5)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    optimizer = _optimizer()
    scheduler = lr_schedule(optimizer, warmup_steps=3, total_steps=20, kind="cosine")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert first + _lrs(optimizer, scheduler, 7) == pytest.approx(straight)


def test_scale_learning_rate_persists():
    optimizer = _optimizer(lr=1.0)
    scheduler = lr_schedule(optimizer, warmup_steps=0, total_steps=10, kind="linear")
    _lrs(optimizer, scheduler, 3)
    before = optimizer.param_groups[0]["lr"]
    scale_learning_rate(optimizer, scheduler, 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before / 2) == pytest.approx(scheduler.get_last_lr()[0])
    state = scheduler.state_dict()
    after = _lrs(optimizer, scheduler, 2)
    assert after == pytest.approx([0.5 * (1 - s / 10) for s in (3, 4)])  # same shape, half the rate
    resumed = lr_schedule(_optimizer(lr=1.0), warmup_steps=0, total_steps=10, kind="linear")
    resumed.load_state_dict(state)
    assert resumed.base_lrs == [0.5]
