"""The solver registry: one entry per sampling method, declaring what the method is rather than
leaving callers to sniff its signature.

An entry says which options the solver takes (``options``: keyword names beyond
``denoiser, x, sigmas, generator``), whether its result is random with its default options
(``stochastic``) and which option, if any, switches its noise on or off (``noise_option``:
DDIM's ``eta``, EDM's ``churn``; zero means deterministic),
whether a sample is independent of the others in its batch under per-sample generators
(``batch_independent``; a method that is not must have the batch size in any cache key), and
whether it reports solver statistics into ``info`` (``reports``). To add a method, add one
``Solver(...)`` line to ``SOLVERS``; ``pipeline.sampling.METHODS`` follows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from torch import Tensor

from pipeline.sampling.adaptive import rk45
from pipeline.sampling.ancestral import ddim, ddpm, euler
from pipeline.sampling.dpm_solver import dpmpp_2m, dpmpp_3m_sde
from pipeline.sampling.edm import heun
from pipeline.sampling.ipndm import ipndm
from pipeline.sampling.sde import euler_maruyama, langevin, pc
from pipeline.sampling.unipc import unipc

__all__ = ["METHODS", "SOLVERS", "Solver"]


@dataclass(frozen=True)
class Solver:
    solver: Callable[..., Tensor]
    """``solver(denoiser, x, sigmas, generator=None, **options) -> x0``."""
    options: tuple[str, ...] = ()
    """The keyword options the solver takes."""
    stochastic: bool = False
    """The method draws noise with its default options."""
    noise_option: str | None = None
    """The option whose non-zero value makes the method draw noise (zero: deterministic)."""
    batch_independent: bool = True
    """A sample depends only on its own noise and generator, not on the rest of its batch."""
    reports: bool = False
    """The solver fills an ``info`` dict with its statistics (passed as ``info=``)."""

    def is_stochastic(self, **options) -> bool:
        """Whether the method draws noise with these options (the solver's defaults otherwise)."""
        if self.noise_option is not None and self.noise_option in options:
            return bool(options[self.noise_option])
        return self.stochastic


SOLVERS: dict[str, Solver] = {
    "ddpm": Solver(ddpm, ("variance",), stochastic=True),
    "ddim": Solver(ddim, ("eta",), noise_option="eta"),
    "euler": Solver(euler),
    "heun": Solver(heun, ("churn", "churn_min", "churn_max", "churn_noise"), noise_option="churn"),
    "rk45": Solver(rk45, ("rtol", "atol"), reports=True),
    "euler_maruyama": Solver(euler_maruyama, stochastic=True),
    "pc": Solver(pc, ("predictor", "corrector_steps", "snr"), stochastic=True),
    "langevin": Solver(langevin, ("steps_per_level", "step_ratio"), stochastic=True),
    "dpmpp_2m": Solver(dpmpp_2m),
    "dpmpp_3m_sde": Solver(dpmpp_3m_sde, ("eta",), stochastic=True, noise_option="eta"),
    "unipc": Solver(unipc, ("order", "corrector")),
    "ipndm": Solver(ipndm, ("max_order",)),
}


class _Methods(Mapping[str, Callable[..., Tensor]]):
    """name -> solver function, a live read-only view of ``SOLVERS``."""

    def __getitem__(self, name: str) -> Callable[..., Tensor]:
        return SOLVERS[name].solver

    def __iter__(self) -> Iterator[str]:
        return iter(SOLVERS)

    def __len__(self) -> int:
        return len(SOLVERS)


METHODS: Mapping[str, Callable[..., Tensor]] = _Methods()
