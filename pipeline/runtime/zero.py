"""A DeepSpeed ZeRO optimiser's state as tensors and plain data, and back, in two forms.

* Per rank (:func:`optimizer_state`): this rank's partition, restored bit for bit by a job on
  the same number of ranks. DeepSpeed's own ``engine.save_checkpoint`` pickles Python objects
  (its loss scaler, enums, parameter-slice mappings) and must be loaded with
  ``weights_only=False``; our checkpoints never unpickle code.
  ``DeepSpeedZeroOptimizer(_Stage3).state_dict()`` is a flat dict whose only such objects are
  the loss scaler (kept here as its numeric attributes and written back into the live scaler on
  load), enums (kept as their values) and the fragment maps that DeepSpeed's "universal
  checkpoint" conversion uses (dropped: the gathered form below serves other world sizes).
* Gathered (:func:`gathered_state`): every parameter's full fp32 master weights and Adam moments
  (``exp_avg``, ``exp_avg_sq``), the Adam step, the parameter groups' hyperparameters, the loss
  scaler and the engine's counters, independent of the number of ranks. A job on another number
  of ranks resumes from it (:func:`load_gathered_state`): each rank takes its own partition of
  every tensor. Gathering and scattering go through DeepSpeed's ``safe_get_full_*`` /
  ``safe_set_full_*`` (ZeRO-1/2) and ``safe_set_local_*`` (ZeRO-3) API, stage 1-3 alike.

Duck-typed over the engine that ``Runtime.prepare`` returns; imports nothing from deepspeed
(``pipeline.runtime.dist`` is the only module that does and passes ``deepspeed.utils`` in as
``api``). The optimiser must keep Adam's state (``torch.optim.Adam``/``AdamW``, what
``pipeline.runtime.optim.build_optimizer`` makes).
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
# Adam's per-element state besides the weights (its "step" is one number per partition).
_MOMENTS = ("exp_avg", "exp_avg_sq")


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


def gathered_state(engine, api, keep: bool) -> dict[str, Any]:
    """The whole optimiser state as full per-parameter tensors on CPU (see the module docstring),
    kept where ``keep`` (the main rank; the others take part in the gathering and get ``{}``).
    Collective: every rank calls it. Without a step taken yet there are no moments."""
    base = engine.optimizer.optimizer
    steps = {float(state["step"]) for state in base.state.values()}
    if len(steps) > 1:
        raise ValueError(f"the ZeRO partitions of this rank are at different Adam steps {sorted(steps)}")
    keys = ("fp32", *_MOMENTS) if steps else ("fp32",)
    if steps:
        _link_moments(engine.optimizer)  # not yet after a resume on the same number of ranks
    full: dict[str, dict[str, torch.Tensor]] = {key: {} for key in keys}
    for name, param in _trainable(engine).items():
        for key in keys:
            if key == "fp32":
                value = api.safe_get_full_fp32_param(param)
            else:
                value = api.safe_get_full_optimizer_state(param, key)
            if keep:
                full[key][name] = value.detach().cpu().clone()
    if not keep:
        return {}
    scaler = engine.optimizer.loss_scaler
    return {
        **full,
        "step": steps.pop() if steps else None,
        "param_groups": _plain([{k: v for k, v in g.items() if k != "params"} for g in base.param_groups], "groups"),
        "loss_scaler": {k: v for k, v in vars(scaler).items() if isinstance(v, _PLAIN)},
        "counters": {k: int(getattr(engine, k)) for k in _COUNTERS},
    }


def load_gathered_state(engine, state: dict[str, Any], api, rank: int) -> None:
    """Restore :func:`gathered_state` (written by any number of ranks) into a freshly prepared
    engine: each rank takes its partition of every fp32 weight and moment. The weights the model
    computes with are not touched: load them from the checkpoint's full model state dict."""
    optimizer = engine.optimizer
    base = optimizer.optimizer
    stage3 = hasattr(optimizer, "fp32_partitioned_groups_flat")
    offloaded = [f for f in ("cpu_offload", "offload_optimizer", "offload_param") if getattr(optimizer, f, False)]
    if offloaded:  # untested: its swapped or pinned buffers might not take the state set here
        raise ValueError(
            f"resuming a ZeRO checkpoint on another number of ranks is not supported with offloading "
            f"({', '.join(offloaded)}): resume on the original number of ranks, or without offload"
        )
    for group, saved in zip(base.param_groups, state["param_groups"], strict=True):
        group.update(saved)  # learning rate (and the rest, as torch's Optimizer.load_state_dict does)
    if state["step"] is not None:
        # Adam creates its state at the first step; make it now (zeros, filled in below), with the
        # step where torch keeps it: on the parameters' device for fused/capturable Adam, else CPU
        flats = optimizer.fp32_partitioned_groups_flat if stage3 else optimizer.single_partition_of_fp32_groups
        on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
        for flat in flats:
            step = torch.tensor(state["step"], dtype=torch.float32, device=flat.device if on_device else "cpu")
            base.state[flat] = {"step": step, **{key: torch.zeros_like(flat) for key in _MOMENTS}}
        _link_moments(optimizer)
    keys = ("fp32", *_MOMENTS) if state["step"] is not None else ("fp32",)
    for name, param in _trainable(engine).items():
        for key in keys:
            value = state[key][name].to(param.device, torch.float32)
            if stage3:  # the local API: safe_set_full_* cuts a wrong slice from parameters not divisible by the ranks
                part = _partition(value, param.ds_tensor.numel(), rank)
                if key == "fp32":
                    api.safe_set_local_fp32_param(param, part)
                else:
                    api.safe_set_local_optimizer_state(param, part, key)
            elif key == "fp32":
                api.safe_set_full_fp32_param(param, value)
            else:
                api.safe_set_full_optimizer_state(param, value, key)
    for name, value in state["loss_scaler"].items():
        setattr(optimizer.loss_scaler, name, value)
    for name, value in state["counters"].items():
        setattr(engine, name, value)


def _link_moments(optimizer) -> None:
    """ZeRO-1/2: point each parameter's fragment map (what ``safe_*_optimizer_state`` reads and
    writes) at the Adam state, which DeepSpeed does at its first step only. ZeRO-3 reads the
    state itself."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._lazy_init_hp_params_optimizer_state()


def _trainable(engine) -> dict[str, Any]:  # DeepSpeed parameters (ZeRO-3: with ds_tensor)
    return {name: p for name, p in engine.module.named_parameters() if p.requires_grad}


def _partition(value: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 partition of a full tensor: elements [rank * size, (rank + 1) * size)
    of it flattened, the last partition padded with zeros."""
    flat = value.flatten()
    part = flat.new_zeros(size)
    start = min(rank * size, flat.numel())
    count = min(size, flat.numel() - start)
    part[:count] = flat[start : start + count]
    return part


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
