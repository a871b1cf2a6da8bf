"""AdamW and its learning-rate schedule, plus the NaN guard's "lower the learning rate".

AdamW is Loshchilov & Hutter (2019), decoupled weight decay, as ``torch.optim.AdamW``; the
fused kernel (one launch per step instead of one per tensor) is used where torch has it for
the parameters' device. The schedule is a linear warm-up followed by a constant, linear or
cosine (Loshchilov & Hutter 2017, SGDR without restarts) decay to ``min_lr_ratio * lr``, as a
``LambdaLR`` whose state goes into checkpoints.

Step the scheduler yourself once per optimiser step and do not pass it to
``Runtime.prepare``: accelerate's scheduler wrapper advances it once per *process* per step
(it assumes schedules written in single-process steps), which would make a 2-rank run follow
another schedule than a 1-rank run with the same global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

SCHEDULES = ("constant", "linear", "cosine")


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``parameters``. ``fused=None`` picks the fused kernel when torch has one for
    every parameter's device (CUDA, and CPU since torch 2.4); True insists, False never."""
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("build_optimizer got no trainable parameters: is the model frozen?")
    if fused is None:
        supported = set(_get_fused_kernels_supported_devices())
        fused = all(p.device.type in supported and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, betas=(betas[0], betas[1]), weight_decay=weight_decay, fused=fused)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (counted from 0).

    Warm-up: ``(step + 1) / warmup_steps``, so the first step already moves (transformers'
    ``get_*_schedule_with_warmup`` spend it at lr 0). Then, with ``p`` the fraction of the
    remaining steps done: constant 1; linear ``1 - (1 - m) p``; cosine
    ``m + (1 - m) (1 + cos(pi p)) / 2``, where m = ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`; call ``.step()`` after each optimiser step
    (not through ``Runtime.prepare``, see the module docstring)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"learning-rate schedule needs warmup_steps >= 0, total_steps >= 1 and "
            f"0 <= min_lr_ratio <= 1; got {warmup_steps}, {total_steps}, {min_lr_ratio}"
        )

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scale_learning_rate(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, factor: float
) -> None:
    """Multiply the learning rate by ``factor`` from now on: the scheduler's base rates (kept in
    its state dict, so later checkpoints carry the lower rate) and the current rates.

    For the NaN guard's roll-back: load the checkpoint first (it restores the old rates), then
    scale. The schedule's shape (warm-up, decay) is unchanged.
    """
    if not factor > 0.0:
        raise ValueError(f"learning-rate factor must be positive, got {factor}")
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
