"""A DeepSpeed ZeRO optimiser's per-rank state as tensors and plain data, and back.

DeepSpeed's own ``engine.save_checkpoint`` pickles Python objects (its loss scaler, enums,
parameter-slice mappings) and must be loaded with ``weights_only=False``; our checkpoints never
unpickle code. ``DeepSpeedZeroOptimizer(_Stage3).state_dict()`` is a flat dict whose only such
objects are the loss scaler (kept here as its numeric attributes and written back into the live
scaler on load), enums (kept as their values) and the fragment maps that DeepSpeed's
"universal checkpoint" conversion uses (dropped: resuming needs the same world size anyway).

Duck-typed over the engine that ``Runtime.prepare`` returns; imports nothing from deepspeed
(``pipeline.runtime.dist`` is the only module that does).
"""

from __future__ import annotations

import enum
from typing import Any

import torch

# Fragment maps for DeepSpeed's universal-checkpoint converter; not needed to resume.
_DROPPED = ("param_slice_mappings", "universal_checkpoint_info")
# Engine counters that DeepSpeed's own checkpoints restore (they drive its step bookkeeping).
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
_PLAIN = (bool, int, float, str, type(None), torch.Tensor, torch.dtype)


def optimizer_state(engine) -> dict[str, Any]:
    """This rank's ZeRO optimiser partition (fp32 master weights, Adam moments, loss scaler)
    and the engine's step counters, as tensors and plain data."""
    state = {k: v for k, v in engine.optimizer.state_dict().items() if k not in _DROPPED}
    state["loss_scaler"] = {k: v for k, v in vars(state["loss_scaler"]).items() if isinstance(v, _PLAIN)}
    return {"optimizer": _plain(state, "optimizer"), "counters": {k: int(getattr(engine, k)) for k in _COUNTERS}}


def load_optimizer_state(engine, state: dict[str, Any], rank: int, world_size: int) -> None:
    """Restore :func:`optimizer_state` into a freshly prepared engine of the same world size."""
    restored = dict(state["optimizer"])
    scaler = engine.optimizer.loss_scaler
    for name, value in restored["loss_scaler"].items():
        setattr(scaler, name, value)
    restored["loss_scaler"] = scaler
    per_rank: list[dict | None] = [
        None
    ] * world_size  # DeepSpeed reads entry [its data-parallel rank] of a per-rank list
    per_rank[rank] = restored
    engine.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
    for name, value in state["counters"].items():
        setattr(engine, name, value)


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"DeepSpeed's optimizer state holds a {type(value).__name__} at {where}, which a weights_only "
        f"checkpoint cannot store: add its conversion to pipeline/runtime/zero.py"
    )
