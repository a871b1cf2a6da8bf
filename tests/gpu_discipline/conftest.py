"""Two stand-ins for a GPU on a CPU-only machine, and the one CUDA rule neither enforces.

- ``meta``: tensors with shapes and dtypes but no data, on the device "meta". A whole training
  step runs on it (forward, backward, optimiser step), and any op that meets a CPU tensor
  (other than a 0-dim one, which CUDA accepts too) raises, as it would on CUDA.
- ``fake_cuda``: :class:`torch._subclasses.fake_tensor.FakeTensorMode`, whose tensors report
  the device ``cuda:0`` and follow CUDA's device rules (a CPU table meeting them raises
  ``FakeTensorDeviceMismatchError``). Forward passes, losses, bf16 autocast run; backward does
  not (autograd needs a real CUDA context), so training steps run on ``meta``.

Neither checks that a ``torch.Generator`` draws only onto its own device, which CUDA enforces
("Expected a 'cuda' device type for generator but found 'cpu'"). :meth:`StandIn.running`
therefore wraps torch's random constructors and in-place samplers so that a draw with a
generator of another device type than the draw's raises that same error. The wrappers are on
only while library code runs, never while modules are built (``with torch.device(...)``
recognises factory functions by identity, and module initialisers draw without generators).

What neither stand-in can do: produce data-dependent outputs (``.item()``, ``bool(t)``,
``bincount``'s output size, a branch on a tensor's value). Code paths that need one are checked
for real on the CPU, and each test says so where it happens.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

RANDOM_FUNCTIONS = (
    "randn",
    "rand",
    "randint",
    "randperm",
    "randn_like",
    "rand_like",
    "randint_like",
    "multinomial",
    "normal",
    "bernoulli",
    "poisson",
)
"""torch.* constructors that take ``generator=``."""
RANDOM_METHODS = (
    "normal_",
    "uniform_",
    "random_",
    "bernoulli_",
    "exponential_",
    "geometric_",
    "log_normal_",
    "cauchy_",
)
"""In-place samplers on tensors that take ``generator=``."""


def _draw_device(args: tuple, kwargs: dict) -> torch.device:
    """Where a random constructor puts its result: ``device=``, else the device of its tensor
    argument (*_like, multinomial, normal(mean, std), bernoulli, poisson), else the default."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return torch.get_default_device()


def _refuse_foreign_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        # CUDA's own message (aten/src/ATen/core/Generator.h, check_generator)
        raise RuntimeError(f"Expected a '{device.type}' device type for generator but found '{generator.device.type}'")


def _checked_function(draw: Callable) -> Callable:
    @functools.wraps(draw)
    def checked(*args, **kwargs):
        _refuse_foreign_generator(kwargs.get("generator"), _draw_device(args, kwargs))
        return draw(*args, **kwargs)

    return checked


def _checked_method(draw: Callable) -> Callable:
    @functools.wraps(draw)
    def checked(self, *args, **kwargs):
        _refuse_foreign_generator(kwargs.get("generator"), self.device)
        return draw(self, *args, **kwargs)

    return checked


@contextlib.contextmanager
def generators_draw_on_their_own_device() -> Iterator[None]:
    """While active, a random draw with a generator of another device type raises (as CUDA)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in RANDOM_FUNCTIONS:
            patch.setattr(torch, name, _checked_function(getattr(torch, name)))
        for name in RANDOM_METHODS:
            patch.setattr(torch.Tensor, name, _checked_method(getattr(torch.Tensor, name)))
        yield


class StandIn:
    """A GPU stand-in: move real CPU modules and tensors onto it, then run library code inside
    :meth:`running`."""

    name: str
    device: torch.device
    can_backward: bool

    def module(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._mode(), generators_draw_on_their_own_device():
            yield

    def _mode(self):
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return self.name


class Meta(StandIn):
    name, device, can_backward = "meta", torch.device("meta"), True

    def module(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)


class FakeCuda(StandIn):
    name, device, can_backward = "fake_cuda", torch.device("cuda", 0), False

    def __init__(self):
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)

    def module(self, module: nn.Module) -> nn.Module:
        """What ``module.to("cuda")`` does, done by hand: nn.Module._apply swaps tensors in place,
        which fake tensors refuse (weak references)."""
        with self.mode:
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None:
                        sub._parameters[name] = nn.Parameter(self.tensor(p.detach()), p.requires_grad)
                for name, b in list(sub._buffers.items()):
                    if b is not None:
                        sub._buffers[name] = self.tensor(b)
        return module

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        with self.mode:
            return self.mode.from_tensor(t).to(self.device)

    def _mode(self):
        return self.mode

    @contextlib.contextmanager
    def bf16_autocast(self) -> Iterator[None]:
        """torch.autocast("cuda", bfloat16) switches itself off when no CUDA driver answers;
        the stand-in answers for it (the autocast dispatch itself is torch's own)."""
        with (
            mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
            mock.patch("torch.cuda.is_bf16_supported", return_value=True),
        ):
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        with autocast:
            yield


@pytest.fixture(params=["meta", "fake_cuda"])
def stand_in(request) -> StandIn:
    """Each GPU stand-in in turn (forward-only checks)."""
    return Meta() if request.param == "meta" else FakeCuda()


@pytest.fixture
def meta() -> Meta:
    """The stand-in that runs backward and optimiser steps."""
    return Meta()


@pytest.fixture
def fake_cuda() -> FakeCuda:
    return FakeCuda()
