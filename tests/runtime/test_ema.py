"""EMA against its closed form, resume equivalence, buffers, warm-up schedule."""

import io

import pytest
import torch

from pipeline.runtime.ema import EMA


def _toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _steps(module, count, start=1):
    """Deterministic weight changes: parameters set to step-dependent values."""
    for step in range(start, start + count):
        with torch.no_grad():
            for index, p in enumerate(module.parameters()):
                p.copy_(torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step + 10 * index).view_as(p))
            module[1].running_mean.fill_(step)
        yield step


def test_constant_decay_matches_closed_form():
    module, decay, n = _toy(), 0.9, 7
    start = [p.detach().clone() for p in module.parameters()]
    ema = EMA(module, decay)
    history = []
    for step in _steps(module, n):
        history.append([p.detach().clone() for p in module.parameters()])
        ema.update(module, step)
    averaged = ema.averaged_state_dict()
    for index, (name, _) in enumerate(module.named_parameters()):
        # shadow_n = d^n p_0 + sum_k (1 - d) d^(n-k) p_k
        expected = decay**n * start[index] + sum(
            (1 - decay) * decay ** (n - k) * history[k - 1][index] for k in range(1, n + 1)
        )
        torch.testing.assert_close(averaged[name], expected, rtol=1e-6, atol=1e-6)
    assert averaged["1.running_mean"].eq(n).all()  # buffers are copied, not averaged
    assert averaged["1.num_batches_tracked"].dtype == torch.long


def test_warmup_schedule():
    ema = EMA(_toy(), 0.99, warmup_steps=50)
    assert ema.decay_at(1) == 0.0  # the first update copies the weights
    horizons = [1 / (1 - ema.decay_at(s)) for s in range(1, 52)]
    torch.testing.assert_close(
        torch.tensor(horizons, dtype=torch.float64), torch.linspace(1, 100, 51, dtype=torch.float64)
    )
    assert ema.decay_at(51) == pytest.approx(0.99) and ema.decay_at(10_000) == pytest.approx(0.99)
    assert EMA(_toy(), 0.99).decay_at(1) == 0.99
    with pytest.raises(ValueError, match="counted from 1"):
        ema.decay_at(0)


def test_warmup_first_update_copies():
    module = _toy()
    ema = EMA(module, 0.999, warmup_steps=100)
    next(_steps(module, 1))
    ema.update(module, 1)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(ema.averaged_state_dict()[name], value.to(ema.shadow[name].dtype))


def test_resume_equals_uninterrupted():
    straight, module = EMA(_toy(), 0.95, warmup_steps=5), _toy()
    for step in _steps(module, 12):
        straight.update(module, step)

    module = _toy()
    first = EMA(module, 0.95, warmup_steps=5)
    for step in _steps(module, 6):
        first.update(module, step)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = EMA(_toy(), 0.5)  # hyper-parameters come from the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in _steps(module, 6, start=7):
        resumed.update(module, step)
    for name, value in straight.averaged_state_dict().items():
        assert torch.equal(value, resumed.averaged_state_dict()[name]), name


def test_copy_to_and_dtypes():
    module = _toy().to(torch.bfloat16)
    ema = EMA(module, 0.5)
    assert all(ema.shadow[name].dtype == torch.float32 for name, _ in module.named_parameters())
    target = _toy().to(torch.bfloat16)
    for p in target.parameters():
        p.data.zero_()
    ema.copy_to(target)
    for (name, p), q in zip(module.named_parameters(), target.parameters()):
        assert torch.equal(p, q), name


def test_refuses_another_model():
    ema = EMA(_toy(), 0.9)
    with pytest.raises(ValueError, match="unwrapped model"):
        ema.update(torch.nn.Linear(3, 4), 1)
    with pytest.raises(ValueError, match="another model"):
        ema.load_state_dict(EMA(torch.nn.Linear(3, 4), 0.9).state_dict())
