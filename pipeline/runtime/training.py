"""The training toolkit every training stage uses: what a job saves and resumes, when it stops,
what it does with a non-finite step, and the progress it reports.

* :class:`TrainState`: the models with their optimisers, the learning-rate schedule, the EMA,
  the data loader and the progress counters. ``save()`` writes them through the atomic per-rank
  layout of :mod:`pipeline.runtime.checkpoint`; ``resume()`` loads the newest checkpoint that
  every rank can read (``checkpoint.load_latest``: a truncated newest one falls back to the one
  before), after setting aside checkpoints made under another config or other inputs.
* :class:`TrainingLoop`: the step loop around a stage's own forward/backward. Once per optimiser
  step it packs ``[stop wanted, loss non-finite, gradient non-finite]`` into one tensor, reduces
  it across ranks with ONE collective and reads it with ONE host sync (``.tolist()``); everything
  else it logs (loss, grad norm, the stage's terms) is fetched from the device only on log steps.
  A stop (SIGUSR1/SIGTERM/SIGINT or the time budget) seen at the end of step n saves at step n + 1 and
  raises :class:`~pipeline.errors.StageInterrupted`; the first step boundary of a job is checked
  on its own. A non-finite step is skipped; ``max_nonfinite_steps`` of them in a row either stop
  the stage (:class:`NonFiniteLossError`) or roll back to the newest checkpoint with the learning
  rate times ``rollback_lr_factor`` per rollback, at most ``max_rollbacks`` times.
* Progress (:mod:`pipeline.runtime.progress`): on a terminal, a tqdm bar; otherwise (SLURM logs,
  redirected output) one log line every ``log_every`` steps or every 60 s, whichever comes later:
  step/total, loss, images/s, data-wait share, elapsed, ETA.
* The GPU fast path of a training stage: TF32 matmuls/convolutions, ``torch.compile`` of the
  network, channels_last for convolutional networks, non-blocking host->device copies
  (:func:`configure_backends`, :func:`prepare_network`, :func:`to_device`).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from pipeline import config, stage_registry
from pipeline.data.stream import ShardLoader, endless
from pipeline.errors import LatentpipeError, StageInterrupted
from pipeline.runtime import checkpoint, preemption
from pipeline.runtime.dist import Runtime
from pipeline.runtime.ema import EMA
from pipeline.runtime.logging import MetricsLog
from pipeline.runtime.optim import scale_learning_rate
from pipeline.runtime.preemption import StopSignal
from pipeline.runtime.progress import ProgressDisplay, Window

log = logging.getLogger(__name__)

STATE_LAYOUT = "train-state-2"
"""Version of what :class:`TrainState` writes; checkpoints of another layout (the stages' own
before this toolkit) are set aside like those of another config instead of failing to load."""


class NonFiniteLossError(LatentpipeError):
    """Training diverged: too many non-finite steps in a row and no rollback left."""


class LoopConfig(Protocol):
    """The fields a training stage's config section provides to :class:`TrainingLoop`."""

    max_steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    time_budget_minutes: float | None
    learning_rate: float
    max_nonfinite_steps: int
    on_nonfinite: Literal["rollback", "stop"]
    rollback_lr_factor: float
    max_rollbacks: int


# ----------------------------------------------------------------------------- the GPU fast path


def configure_backends(device: torch.device, tf32: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA (10 mantissa bits in the products,
    fp32 accumulation: DiT's and EDM2's training setting); off with ``tf32=False``. Process-wide,
    so every stage sets it for itself; nothing changes on other devices."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def prepare_network(
    net: torch.nn.Module, device: torch.device, *, compile: bool, channels_last: bool
) -> torch.nn.Module:
    """``net`` on ``device`` for training: channels_last on CUDA when asked (for convolutional
    networks: cuDNN's fast NHWC kernels), compiled in place with ``torch.compile`` when asked
    (``Module.compile`` keeps the module and its state-dict keys, so checkpoints and the EMA
    are unchanged)."""
    device = torch.device(device)
    net = net.to(device)
    if channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    if compile:
        net.compile()
    return net


def to_device(tensor: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch tensor on the compute device: a non-blocking copy (asynchronous from pinned
    memory), channels_last for 4-d image batches on CUDA when asked."""
    device = torch.device(device)
    if channels_last and device.type == "cuda" and tensor.dim() == 4:
        return tensor.to(device, non_blocking=True, memory_format=torch.channels_last)
    return tensor.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- state


@dataclass
class Progress:
    """Counters that travel with the weights (optimiser steps taken, rollbacks, skipped steps)."""

    step: int = 0
    rollbacks: int = 0
    skipped_steps: int = 0


class TrainState:
    """Everything a training job must save to continue bit for bit, saved and resumed as one.

    ``pairs``: name -> (prepared model, its optimiser); the first pair is the primary one (the
    EMA follows it, the scheduler drives its optimiser). Shared state (weights, optimisers,
    scheduler, EMA, gradient scaler, progress, every rank's loader position) goes to
    ``state.pt``; each rank's own (ZeRO partitions) to its rank file, and under ZeRO the
    optimiser state gathered whole to ``elastic.pt``. A checkpoint resumes on any number of
    ranks (the loader continues the epoch, see ``ShardLoader.resume``; ZeRO reshards its
    optimiser state from ``elastic.pt``), and bit for bit on the same number.
    """

    def __init__(
        self,
        runtime: Runtime,
        directory: Path,
        *,
        resume_key: str,
        keep: int,
        loader: ShardLoader,
        pairs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        ema: EMA | None = None,
    ):
        self.runtime, self.directory, self.keep = runtime, Path(directory), keep
        self.resume_key = f"{STATE_LAYOUT}:{resume_key}"
        self.loader, self.pairs, self.scheduler, self.ema = loader, pairs, scheduler, ema
        self.progress = Progress()

    @property
    def model(self) -> torch.nn.Module:
        return next(iter(self.pairs.values()))[0]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for _, optimizer in self.pairs.values()]

    def save(self) -> Path:
        """Checkpoint at the current step (collective: every rank calls it)."""
        # every rank's loader position in the shared state: a job on another number of ranks continues the epoch
        shared: dict[str, Any] = {
            "progress": asdict(self.progress),
            "runtime": self.runtime.state_dict(),
            "loaders": self.runtime.gather_objects(self.loader.state_dict()),
        }
        own: dict[str, Any] = {}
        elastic: dict[str, Any] = {}
        for name, (model, optimizer) in self.pairs.items():
            shared[name], own[name], elastic[name] = self.runtime.training_state(model, optimizer)
        if self.scheduler is not None:
            shared["scheduler"] = self.scheduler.state_dict()
        if self.ema is not None:
            shared["ema"] = self.ema.state_dict()
        return checkpoint.save(
            self.directory,
            self.progress.step,
            shared,
            own,
            self.runtime,
            self.keep,
            self.resume_key,
            elastic if any(elastic.values()) else None,
        )

    def resume(self, name: str) -> Path | None:
        """Continue from the newest readable checkpoint made under the same resume key (others
        are set aside); its path, or None when starting afresh."""
        checkpoint.set_aside_if_stale(self.directory, self.resume_key, self.runtime)
        if (found := self.restore()) is not None:
            log.info("%s: resumed from %s (step %d)", name, found, self.progress.step)
        return found

    def restore(self) -> Path | None:
        """Load the newest checkpoint every rank can read; its path, or None when there is none."""
        if (found := checkpoint.load_latest(self.directory, self.runtime)) is None:
            return None
        path, shared, own = found
        for name, (model, optimizer) in self.pairs.items():
            self.runtime.load_training_state(model, optimizer, shared[name], None if own is None else own[name])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(shared["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(shared["ema"])
        if "loaders" in shared:
            self.loader.resume(shared["loaders"])
        elif own is not None:  # written before the positions were shared
            self.loader.load_state_dict(own["loader"])
        else:
            raise LatentpipeError(
                f"{path} predates elastic resume and was written by another number of ranks: "
                f"rerun with its number of processes"
            )
        self.runtime.load_state_dict(shared["runtime"])
        self.progress = Progress(**shared["progress"])
        return path

    def set_learning_rate(self, lr: float) -> None:
        """Train at ``lr`` from now on (scheduled: the schedule's peak; it keeps its shape)."""
        for optimizer in self.optimizers:
            if self.scheduler is not None and self.scheduler.optimizer is optimizer:
                scale_learning_rate(optimizer, self.scheduler, lr / float(self.scheduler.base_lrs[0]))
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr


# ----------------------------------------------------------------------------- the loop


def start_training(
    cfg: config.Config,
    stage: str,
    directory: Path,
    inputs: Mapping[str, str],
    runtime: Runtime,
    *,
    resumable: Sequence[str],
    keep: int,
    loader: ShardLoader,
    pairs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: EMA | None = None,
    identity: Mapping[str, Any] | None = None,
) -> tuple[TrainState, MetricsLog]:
    """A training stage's state, resumed from its newest readable checkpoint, and its metrics log
    starting at the step the weights are at. Checkpoints are kept only while the stage's config
    (less the ``resumable`` keys), its ``inputs`` and any extra ``identity`` (e.g. the weights
    fine-tuning starts from) stay the same."""
    spec = stage_registry.get(stage)
    resume_key = (
        config.section_hash(cfg, spec.sections, ignore=tuple(resumable))
        + json.dumps(dict(inputs), sort_keys=True)
        + (json.dumps(dict(identity), sort_keys=True) if identity else "")
    )
    state = TrainState(
        runtime,
        directory / "checkpoints",
        resume_key=resume_key,
        keep=keep,
        loader=loader,
        pairs=pairs,
        scheduler=scheduler,
        ema=ema,
    )
    state.resume(stage)
    metrics_log = MetricsLog(
        directory,
        enabled=runtime.is_main,
        start_step=state.progress.step,
        wandb_project=cfg.experiment.wandb_project,
        config=config.to_dict(cfg),
    )
    return state, metrics_log


class TrainingLoop:
    """The optimiser-step loop of a training stage (see the module docstring). Use as::

        with TrainingLoop(state, cfg.section, "name") as loop:
            for step in loop.steps():
                batch = loop.next_batch()
                ...forward; loop.backward(loss); grad_norm = runtime.clip_grad_norm(...)
                if loop.check(grad_norm):          # False: skipped (or rolled back)
                    ...runtime.step(optimizer); optimizer.zero_grad()
                    loop.done(images, terms)       # schedule, EMA, progress, logs, checkpoints
        state.save()

    ``terms()`` returns the stage's metrics of the step as tensors or numbers; it is called on
    log steps only, so its device->host transfers do not slow the other steps.
    """

    def __init__(
        self,
        state: TrainState,
        cfg: LoopConfig,
        name: str,
        *,
        metrics_log=None,
        flops_per_sample: int | None = None,
        peak_tflops: float | None = None,
    ):
        self.state, self.cfg, self.name, self.metrics_log = state, cfg, name, metrics_log
        self.runtime = state.runtime
        self.flops_per_sample, self.peak_tflops = flops_per_sample, peak_tflops
        self._nonfinite_in_a_row = 0
        self._stop: str | None = None  # why to stop at the next step boundary
        self._reason: str | None = None  # this rank's stop reason, read once per step ...
        self._reason_read = False  # ... at its first check
        self._losses: list[torch.Tensor] = []
        self._flags: list[float] | None = None  # the step's reduced [stop, loss bad, gradient bad]
        self._window = Window()
        self.last_loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None

    def __enter__(self) -> TrainingLoop:
        budget = None if self.cfg.time_budget_minutes is None else self.cfg.time_budget_minutes * 60
        self._signal = StopSignal(budget).__enter__()
        self._display = ProgressDisplay(
            self.name, self.cfg.max_steps, self.state.progress.step, enabled=self.runtime.is_main
        )
        self._batches = endless(self.state.loader)
        self.state.model.train()
        return self

    def __exit__(self, *exc) -> None:
        self._display.close()
        self._signal.__exit__(*exc)

    # -- the step boundary

    def steps(self) -> Iterator[int]:
        """The steps still to take; at each boundary, stops (save + StageInterrupted) if asked."""
        reason = self._signal.reason()
        self._stop = (reason or "another rank") if self.runtime.any(reason is not None) else None
        while self.state.progress.step < self.cfg.max_steps:
            if self._stop is not None:
                self.state.save()
                raise StageInterrupted(
                    f"{self.name} stopped at step {self.state.progress.step} ({self._stop}); "
                    f"rerun the same command to resume",
                    preemption.exit_code(self._stop),
                )
            self._losses, self._flags, self._reason_read = [], None, False
            yield self.state.progress.step

    def next_batch(self) -> dict:
        """The next batch of the loader; the time spent waiting for it counts as data wait."""
        started = time.perf_counter()
        batch = next(self._batches)
        self._window.data_wait += time.perf_counter() - started
        return batch

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate a (micro-batch) loss and remember it for :meth:`check`. Under DeepSpeed
        the optimiser step runs inside backward, so there the loss is checked first (with the
        stop flag, in the one collective) and a non-finite one is not backpropagated."""
        self._losses.append(loss.detach())
        if self.runtime.zero_stage:
            self._flags = self._reduce(_nonfinite(self._losses), None)
            if self._flags[1]:
                return
        self.runtime.backward(loss)

    def check(self, grad_norm: torch.Tensor | None) -> bool:
        """After backward (and gradient clipping): True if the optimiser step may be taken.
        One collective and one host sync for [stop, loss non-finite, gradient non-finite]; the
        gradient is not checked under a gradient scaler (it skips such steps itself) nor under
        DeepSpeed (its step has already run)."""
        self.last_loss = torch.stack(self._losses).mean() if self._losses else None
        if self._flags is None:
            grad_bad = None
            if grad_norm is not None and self.runtime.scaler is None:
                grad_bad = ~torch.isfinite(grad_norm)
            self._flags = self._reduce(_nonfinite(self._losses), grad_bad)
        stop, bad_loss, bad_gradient = self._flags
        if stop:
            self._stop = self._reason or "another rank"
        if not (bad_loss or bad_gradient):
            self._nonfinite_in_a_row = 0
            self._grad_norm = grad_norm
            return True
        self._skip()
        return False

    def _reduce(self, loss_bad: torch.Tensor, grad_bad: torch.Tensor | None) -> list[float]:
        """[stop wanted, loss non-finite, gradient non-finite] on any rank: one all-reduce, one sync."""
        device = self.runtime.device
        if not self._reason_read:
            self._reason, self._reason_read = self._signal.reason(), True
        stop = torch.full((1,), 0.0 if self._reason is None else 1.0, device=device)
        grad = torch.zeros(1, device=device) if grad_bad is None else grad_bad.reshape(1).float().to(device)
        flags = torch.cat([stop, loss_bad.reshape(1).float().to(device), grad])
        self.runtime.reduce_max_(flags)
        return flags.tolist()

    def _skip(self) -> None:
        state, cfg = self.state, self.cfg
        for optimizer in state.optimizers:
            self.runtime.skip_step(optimizer)
        self._nonfinite_in_a_row += 1
        state.progress.skipped_steps += 1
        step = state.progress.step
        log.warning(
            "%s: non-finite loss or gradient at step %d, step skipped (%d in a row)",
            self.name,
            step,
            self._nonfinite_in_a_row,
        )
        if self._nonfinite_in_a_row < cfg.max_nonfinite_steps:
            return
        rollbacks, skipped = state.progress.rollbacks + 1, state.progress.skipped_steps
        if cfg.on_nonfinite == "stop" or rollbacks > cfg.max_rollbacks or (found := state.restore()) is None:
            raise NonFiniteLossError(
                f"{self._nonfinite_in_a_row} non-finite steps in a row at step {step} after {rollbacks - 1} "
                f"rollback(s): lower {self.name}.learning_rate, use {self.name}.mixed_precision=fp32, "
                f"or check the data"
            )
        state.progress.rollbacks, state.progress.skipped_steps = rollbacks, skipped
        # the checkpoint may predate earlier rollbacks: the rate is factor**rollbacks in all
        state.set_learning_rate(cfg.learning_rate * cfg.rollback_lr_factor**rollbacks)
        self._batches, self._nonfinite_in_a_row = endless(state.loader), 0
        self._display.reset(state.progress.step)
        log.warning(
            "%s: rolled back to %s with the learning rate x%g", self.name, found, cfg.rollback_lr_factor**rollbacks
        )

    # -- after the optimiser step

    def done(self, images: int, terms: Callable[[], dict[str, Any]] = dict) -> int:
        """Count the optimiser step just taken (``images``: this rank's samples in it): step the
        schedule and the EMA, report progress, log ``terms()`` on log steps, checkpoint on
        checkpoint steps. Returns the new step count."""
        state, cfg, runtime = self.state, self.cfg, self.runtime
        if state.scheduler is not None:
            with warnings.catch_warnings():  # fp16: the grad scaler skipped an overflowing step, as it should
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                state.scheduler.step()
        step = state.progress.step = state.progress.step + 1
        if state.ema is not None:
            with runtime.full_parameters(state.model):
                state.ema.update(runtime.unwrap(state.model), step)
        self._window.steps += 1
        self._window.samples += images * runtime.world_size
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            values = {name: _number(value) for name, value in terms().items()}
            values.setdefault("loss", _number(self.last_loss))
            if self._grad_norm is not None:
                values["grad_norm"] = _number(self._grad_norm)
            if state.scheduler is not None:
                values["lr"] = float(state.scheduler.get_last_lr()[0])
            values["skipped_steps"] = state.progress.skipped_steps
            values.update(self._window.rates(self.flops_per_sample, self.peak_tflops, runtime.world_size))
            if self.metrics_log is not None:
                self.metrics_log.scalars(step, values)
            self._display.log_step(step, values)
            self._window = Window()
        else:
            self._display.update(step)
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            state.save()
        return step

    def every(self, steps: int) -> bool:
        """True on the steps that are multiples of ``steps`` and on the last one (after done())."""
        step = self.state.progress.step
        return step % steps == 0 or step == self.cfg.max_steps


def _nonfinite(losses: list[torch.Tensor]) -> torch.Tensor:
    return ~torch.isfinite(torch.stack([loss.float() for loss in losses])).all()


def _number(value: Any) -> float:
    return value.item() if isinstance(value, torch.Tensor) else value
