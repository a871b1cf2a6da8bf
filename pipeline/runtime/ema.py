"""Exponential moving average (EMA) of a model's weights, kept in an fp32 shadow.

After each optimiser step ``shadow <- decay_t * shadow + (1 - decay_t) * param`` for every
floating-point parameter (Polyak & Juditsky 1992; the EMA weights that ADM, LDM and DiT sample
with). Buffers (and non-floating parameters) are not averaged: the shadow holds a copy of their
latest value, so ``averaged_state_dict()`` is a complete state dict of the module.

Warm-up. A constant decay close to 1 makes the average remember the random initialisation for
~1/(1 - decay) steps. ADM (Dhariwal & Nichol 2021), diffusers' ``EMAModel`` (``use_ema_warmup=
False``) and ``tf.train.ExponentialMovingAverage(num_updates=...)`` use
``decay_t = min(decay, (1 + t) / (10 + t))``, whose averaging horizon ``1 / (1 - decay_t) =
(10 + t) / 9`` grows linearly in t. We keep that shape but make the slope explicit: the horizon
grows linearly from 1 step (a plain copy) at t = 0 to the full ``H = 1 / (1 - decay)`` at
``t = warmup_steps``::

    h_t     = min(H, 1 + (H - 1) * t / warmup_steps)        (h_t = H when warmup_steps == 0)
    decay_t = 1 - 1 / h_t

where t is the number of EMA updates made before this one (``step - 1``). ADM's rule is the
same line with slope 1/9, i.e. ``warmup_steps = 9 * (H - 1)`` (up to its 10/9 starting horizon).

Distributed use: the EMA is single-device code. Under DeepSpeed ZeRO-3 a rank only holds a
slice of each parameter, so construct, ``update`` and ``copy_to`` inside
``runtime.full_parameters(model)`` (a no-op elsewhere), passing the unwrapped module
(``runtime.unwrap(model)``). diffusers' EMA silently never moved under DeepSpeed (its issue
#5783); tests/runtime checks that this one does.
"""

from __future__ import annotations

from typing import Any

import torch


class EMA:
    """fp32 moving average of ``module``'s floating parameters (see the module docstring).

    ``decay`` in [0, 1): the target decay per update. ``warmup_steps`` >= 0: updates over which
    the averaging horizon grows to ``1 / (1 - decay)``; 0 uses ``decay`` from the first update.
    The shadow starts as a copy of ``module`` and lives on the module's device.
    """

    def __init__(self, module: torch.nn.Module, decay: float, warmup_steps: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}: use e.g. 0.9999")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}")
        self.decay, self.warmup_steps = float(decay), int(warmup_steps)
        self._averaged = _averaged_names(module)
        with torch.no_grad():
            self.shadow = {
                name: _shadow_copy(value, name in self._averaged) for name, value in module.state_dict().items()
            }

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimiser step ``step`` (counted from 1)."""
        if step < 1:
            raise ValueError(f"EMA.update expects the optimiser step just taken, counted from 1; got {step}")
        if self.warmup_steps == 0:
            return self.decay
        horizon = 1.0 / (1.0 - self.decay)
        h_t = min(horizon, 1.0 + (horizon - 1.0) * (step - 1) / self.warmup_steps)
        return 1.0 - 1.0 / h_t

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        """Fold ``module``'s current weights in; ``step`` is the optimiser step just taken (from 1)."""
        weight = 1.0 - self.decay_at(step)
        state = module.state_dict()
        if state.keys() != self.shadow.keys():
            raise ValueError(
                f"EMA.update got a module with other entries than the averaged one "
                f"(missing {sorted(self.shadow.keys() - state.keys())[:5]}, "
                f"unexpected {sorted(state.keys() - self.shadow.keys())[:5]}): pass the unwrapped model"
            )
        for name, value in state.items():
            target = self.shadow[name]
            if value.shape != target.shape:
                raise ValueError(
                    f"EMA.update: {name} has shape {tuple(value.shape)}, the average "
                    f"{tuple(target.shape)}; under ZeRO-3 update inside runtime.full_parameters(model)"
                )
            if name in self._averaged:
                target.lerp_(value.to(device=target.device, dtype=torch.float32), weight)
            else:
                target.copy_(value)

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights as CPU tensors, keyed like ``module.state_dict()`` (floating
        parameters in fp32, buffers in their own dtype): ready for safetensors export."""
        return {name: value.detach().cpu().clone().contiguous() for name, value in self.shadow.items()}

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into ``module`` (cast to its dtypes and device)."""
        state = module.state_dict()
        for name, value in self.shadow.items():
            state[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data only (checkpoints load with ``weights_only=True``)."""
        return {
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "averaged": sorted(self._averaged),
            "shadow": self.averaged_state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shadow"].keys() != self.shadow.keys() or set(state["averaged"]) != self._averaged:
            raise ValueError(
                "EMA checkpoint was made for another model (its entries differ): "
                "resume with the same network configuration or start afresh"
            )
        self.decay, self.warmup_steps = float(state["decay"]), int(state["warmup_steps"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def _averaged_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of the floating-point parameters (tied parameters under every name)."""
    parameters = {id(p) for p in module.parameters() if p.is_floating_point()}
    return {name for name, value in module.state_dict(keep_vars=True).items() if id(value) in parameters}


def _shadow_copy(value: torch.Tensor, averaged: bool) -> torch.Tensor:
    copy = value.detach().clone()
    return copy.float() if averaged else copy
