"""Process group, devices, mixed precision, DeepSpeed ZeRO and collectives: the one place that
touches accelerate, deepspeed and torch.distributed. Models and math receive collectives as
plain functions (``all_reduce_sum``, ``all_gather_rows``) and stay single-device code.

Launch several processes with ``torchrun`` (or ``accelerate launch``; ``--cpu`` uses gloo); a
plain ``python``/``latentpipe`` call is a world of one.

Two modes behind one training-loop API (``prepare``, ``autocast``, ``backward``,
``clip_grad_norm``, ``step``, ``training_state``/``load_training_state``, ``full_parameters``):

* DDP (``deepspeed=None``): accelerate wraps the model in ``DistributedDataParallel``; mixed
  precision is our autocast (+ a ``GradScaler`` for fp16), the optimiser is the caller's.
* DeepSpeed ZeRO 1/2/3 (``deepspeed=<path to a JSON config>``, see ``configs/deepspeed/``):
  accelerate's DeepSpeed integration (https://huggingface.co/docs/accelerate/usage_guides/deepspeed)
  hands model and optimiser to ``deepspeed.initialize``. DeepSpeed then owns precision (its
  ``bf16``/``fp16`` sections, filled from ``precision``), loss scaling, gradient clipping (its
  ``gradient_clipping`` key, filled from ``grad_clip``), the optimiser step (run inside
  ``backward`` by accelerate) and gradient accumulation (its ``gradient_accumulation_steps``,
  filled from ours). Works on CPU over gloo (tested) and on CUDA over NCCL.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from pipeline.errors import LatentpipeError
from pipeline.runtime import zero

COLLECTIVE_TIMEOUT_ENV = "LATENTPIPE_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 900.0
"""How long a collective (or a barrier around a checkpoint save) may wait for a peer before the
rank gives up with an error instead of hanging: a peer that died without closing its sockets
(a lost node) or hangs. A peer killed on a live node closes its sockets and the others fail at
once. Must exceed the slowest checkpoint write, which the other ranks wait for in a barrier."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class MissingDeepSpeedConfig(LatentpipeError, FileNotFoundError):
    """The DeepSpeed JSON is checked here, where it is read, not while the config loads."""


class Runtime:
    """One rank's view of the job: accelerate's ``Accelerator`` plus the collectives we need.

    ``precision``: fp32 | bf16 | fp16. Without DeepSpeed it is applied here (autocast, and a
    gradient scaler for fp16) rather than by accelerate, so that the several stages of one
    ``latentpipe run`` process can each have their own. ``deepspeed``: path of a DeepSpeed JSON
    config (ZeRO stage 1, 2 or 3); "auto" values are filled from ``precision``, ``grad_clip``
    (0: no clipping), ``batch_size`` (per rank; DeepSpeed only uses it for its throughput log
    and its batch-size check) and ``gradient_accumulation_steps``.

    Gradient accumulation (both modes): run each micro-batch inside ``runtime.accumulate(model)``;
    ``backward`` divides the loss by the number of steps, and ``clip_grad_norm``, ``step`` and the
    prepared optimiser's ``zero_grad`` do nothing until ``runtime.sync_gradients`` is True, i.e.
    on the last micro-batch, which is when the training loop should count an optimiser step.

    accelerate keeps its configuration in process-global state; each Runtime resets it, so the
    newest Runtime is the live one (one stage after the other, any mix of DDP and DeepSpeed) and
    an older one must not be used after a newer one was made.
    """

    def __init__(
        self,
        *,
        precision: str = "fp32",
        cpu: bool | None = None,
        deepspeed: str | Path | None = None,
        grad_clip: float = 0.0,
        batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.accelerator = _fresh_accelerator(
            precision, cpu, deepspeed, grad_clip, batch_size, gradient_accumulation_steps
        )
        self.zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage if deepspeed is not None else 0
        self.dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" and not self.zero_stage else None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sync_gradients(self) -> bool:
        """False on the micro-batches of an accumulation window before its last one."""
        return self.accelerator.sync_gradients

    def prepare(self, *objects):
        """Wrap models/optimisers for the launch mode (DDP or a DeepSpeed engine). Under DeepSpeed
        pass the model and its optimiser in one call. Learning-rate schedulers are stepped by the
        caller and not prepared (see :mod:`pipeline.runtime.optim`)."""
        if any(isinstance(o, torch.optim.lr_scheduler.LRScheduler) for o in objects):
            raise TypeError(
                "do not pass the learning-rate scheduler to Runtime.prepare: accelerate would step it "
                "once per process per step; call scheduler.step() after runtime.step() instead"
            )
        return self.accelerator.prepare(*objects)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def accumulate(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Context for one micro-batch of gradient accumulation (accelerate's ``accumulate``)."""
        return self.accelerator.accumulate(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate (and under DeepSpeed also clip, step the optimiser and zero the
        gradients at the end of an accumulation window: DeepSpeed's ``engine.step``)."""
        self.accelerator.backward(loss if self.scaler is None else self.scaler.scale(loss))

    def clip_grad_norm(self, parameters, max_norm: float, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Clip the gradients' global norm to ``max_norm`` and return the norm before clipping
        (None inside an accumulation window). Under DeepSpeed the clipping already happened in
        ``backward`` with the config's ``gradient_clipping`` (``Runtime(grad_clip=...)``), which
        must equal ``max_norm``; this returns the norm DeepSpeed measured."""
        if not self.sync_gradients:
            return None
        if self.zero_stage:
            configured = float(self.accelerator.deepspeed_config.get("gradient_clipping", 0.0))
            if configured != max_norm:
                raise ValueError(
                    f"DeepSpeed clips gradients at {configured} (its config's gradient_clipping) but the "
                    f"training loop asks for {max_norm}: pass grad_clip={max_norm} to Runtime(...)"
                )
            return torch.tensor(float(self.accelerator.clip_grad_norm_(parameters, max_norm)))
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step (skipped by the fp16 scaler when gradients overflowed). Does nothing
        inside an accumulation window, and under DeepSpeed, whose step ran in ``backward``."""
        if not self.sync_gradients or self.zero_stage:
            return
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def skip_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients instead of stepping. Under the fp16 gradient scaler, whose
        ``unscale_`` (in :meth:`clip_grad_norm`) already saw the non-finite gradients, also end
        its step with ``update()``, which lowers the scale as a skipped ``scaler.step`` would."""
        optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        if (
            scaler is not None
            and self.sync_gradients
            and not self.zero_stage
            and bool(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"])
        ):
            scaler.update()

    def state_dict(self) -> dict:
        """The runtime's own state (the fp16 gradient scaler; DeepSpeed's loss scaler is part of
        :meth:`training_state`)."""
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def training_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
        """(shared, own, elastic) state of a prepared model and its optimiser, for ``checkpoint.save``:
        tensors and plain data only. ``shared["model"]`` is always the full state dict of the
        unwrapped model (gathered under ZeRO-3), usable for export. DDP: the optimiser is in
        ``shared`` and ``elastic`` is empty. ZeRO: ``own`` is this rank's optimiser partition (fp32
        master weights, Adam moments, loss scaler), what a job on the same number of ranks resumes
        from; ``elastic`` (main rank only, empty elsewhere) is the whole optimiser state gathered
        into full per-parameter tensors, what a job on another number of ranks resumes from.
        Collective under ZeRO."""
        with self.full_parameters(model):
            weights = {k: v.detach().cpu().clone() for k, v in self.unwrap(model).state_dict().items()}
        if not self.zero_stage:
            return {"model": weights, "optimizer": optimizer.state_dict()}, {}, {}
        import deepspeed.utils

        gathered = zero.gathered_state(model, deepspeed.utils, keep=self.is_main)
        return {"model": weights}, {"zero": zero.optimizer_state(model)}, {"zero_full": gathered} if gathered else {}

    def load_training_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, shared: dict, own: dict | None
    ) -> None:
        """Restore what :meth:`training_state` returned (from ``checkpoint.load``): ``own`` is this
        rank's own state, or, for a checkpoint written by another number of ranks, the ``elastic``
        state (None when it has none: DDP, or ZeRO checkpoints written before it existed). DDP keeps
        the full optimiser state in ``shared`` and ZeRO's elastic state is resharded onto this
        job's ranks, so both resume on any number of ranks. Collective under ZeRO."""
        if not self.zero_stage:
            self.unwrap(model).load_state_dict(shared["model"])
            optimizer.load_state_dict(shared["optimizer"])
            return
        if own is None:
            raise LatentpipeError(
                "this checkpoint was written by another number of ranks and holds only per-rank "
                "DeepSpeed ZeRO optimizer partitions (it predates elastic ZeRO checkpoints): rerun "
                "with the original number of processes"
            )
        if "zero" not in own and "zero_full" not in own:
            raise ValueError(
                "this checkpoint holds no DeepSpeed optimizer partitions (it was written without "
                "DeepSpeed): resume it without the deepspeed config, or start afresh"
            )
        if "zero" in own:  # written by as many ranks as this job has
            if self.zero_stage < 3:  # ZeRO-3 rebuilds its weight partitions from the fp32 master copy
                self.unwrap(model).load_state_dict(shared["model"])
            zero.load_optimizer_state(model, own["zero"], self.rank, self.world_size)
            return
        import deepspeed

        # the weights the model computes with (bf16/fp16 or fp32), then the fp32 optimiser state
        with deepspeed.zero.GatheredParameters(
            list(self.unwrap(model).parameters()), modifier_rank=0, enabled=self.zero_stage == 3
        ):
            self.unwrap(model).load_state_dict(shared["model"])
        zero.load_gathered_state(model, own["zero_full"], deepspeed.utils, self.rank)

    def full_parameters(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Context in which ``self.unwrap(model)``'s parameters are complete on every rank (read
        only): ZeRO-3 gathers its partitions (``deepspeed.zero.GatheredParameters``); elsewhere they
        already are. Use it around EMA updates and weight export. Collective under ZeRO-3."""
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.unwrap(model).parameters()), modifier_rank=None)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (a new tensor; the input is not modified)."""
        if self.world_size == 1:
            return tensor
        out = tensor.clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows along dim 0 in rank order; row counts may differ."""
        if self.world_size == 1:
            return tensor
        count = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        torch_dist.all_gather(counts, count)
        longest = int(max(c.item() for c in counts))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (plain picklable data), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, value)
        return out

    def reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the ranks, in place and without a host sync (for flags that
        the caller reads with one ``.tolist()``)."""
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (e.g. a preemption signal, a NaN)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())


def collective_timeout() -> timedelta:
    """The process group's timeout: ``$LATENTPIPE_COLLECTIVE_TIMEOUT_S`` seconds (default 900)."""
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV, str(DEFAULT_COLLECTIVE_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise LatentpipeError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: give the seconds a collective may wait, e.g. 900")
    return timedelta(seconds=seconds)


def _fresh_accelerator(
    precision: str,
    cpu: bool | None,
    deepspeed: str | Path | None,
    grad_clip: float,
    batch_size: int | None,
    gradient_accumulation_steps: int,
):
    """An ``Accelerator`` configured from scratch. accelerate's state is process-global and
    refuses changes once made, so it is reset first; the process group itself survives the reset
    (accelerate and DeepSpeed only create one when none exists)."""
    if not torch.cuda.is_available():  # what DeepSpeed would detect, said so it does not warn in every stage's log
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # set by an earlier DeepSpeed Accelerator
    # the timeout bounds every collective: a dead or hung peer ends the job instead of hanging it
    timeout = collective_timeout()
    if deepspeed is None:
        return Accelerator(
            cpu=not torch.cuda.is_available() if cpu is None else cpu,
            gradient_accumulation_steps=gradient_accumulation_steps,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
        )
    if cpu:
        raise ValueError("DeepSpeed picks its device itself: leave cpu unset (it uses CPU + gloo without CUDA)")
    config = _deepspeed_config(deepspeed, grad_clip, batch_size, gradient_accumulation_steps)
    _single_process_environment()
    group = (
        InitProcessGroupKwargs(timeout=timeout)
        if torch.cuda.is_available()
        else InitProcessGroupKwargs(backend="gloo", timeout=timeout)
    )
    return Accelerator(
        deepspeed_plugin=_deepspeed_plugin(config),
        kwargs_handlers=[group],
        mixed_precision=_ACCELERATE_PRECISION[precision],
        gradient_accumulation_steps=gradient_accumulation_steps,
    )


def _deepspeed_plugin(config: dict[str, Any]):
    """accelerate's ``DeepSpeedPlugin`` without its hook for transformers' ``zero.Init`` model
    loading, which we do not use and which accelerate 1.15 installs unconditionally (it fails
    with "No package metadata was found for transformers" when transformers is absent)."""
    from accelerate.utils import DeepSpeedPlugin

    class Plugin(DeepSpeedPlugin):
        def set_deepspeed_weakref(self) -> None:
            pass

    return Plugin(hf_ds_config=config)


def _deepspeed_config(
    path: str | Path, grad_clip: float, batch_size: int | None, gradient_accumulation_steps: int
) -> dict[str, Any]:
    """The JSON config with our "auto" keys filled in; explicit values are kept."""
    path = Path(path)
    if not path.is_file():
        raise MissingDeepSpeedConfig(f"DeepSpeed config {path} does not exist: use one of configs/deepspeed/*.json")
    config = json.loads(path.read_text())
    if config.get("zero_optimization", {}).get("stage") not in (1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (plain DDP needs no DeepSpeed config)")
    if "optimizer" in config or "scheduler" in config:
        raise ValueError(
            f"{path}: remove the optimizer/scheduler sections; the stage builds AdamW and its "
            f"schedule itself (pipeline.runtime.optim)"
        )
    ours = {
        "gradient_clipping": float(grad_clip),
        "train_micro_batch_size_per_gpu": batch_size or 1,
        "gradient_accumulation_steps": gradient_accumulation_steps,
    }
    for key, value in ours.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    return config


def _single_process_environment() -> None:
    """DeepSpeed needs a launcher's environment; give a plain ``python`` call a world of one."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
