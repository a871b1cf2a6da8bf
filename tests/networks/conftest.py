import pytest
import torch


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (the zero-initialised ones included) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def _inputs(batch: int = 3, channels: int = 4, size: int = 8, seed: int = 1):
    """Latents (batch, channels, size, size) and network times in [0, 1000)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen), torch.rand(batch, generator=gen) * 1000


@pytest.fixture
def randomise():
    return _randomise


@pytest.fixture
def net_inputs():
    return _inputs
