"""What a training job tells the people watching it: throughput since the last log step, and
progress where they look. On a terminal a tqdm bar; otherwise (SLURM logs, redirected output)
one log line every log step, at most one per ``LATENTPIPE_PROGRESS_SECONDS`` (default 60)
seconds, whichever comes later, and always at the last step: step/total, loss, images/s,
data-wait share, elapsed and ETA."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)

PROGRESS_SECONDS_ENV = "LATENTPIPE_PROGRESS_SECONDS"
"""Environment variable: least seconds between two progress lines when output is not a terminal."""


class Window:
    """Throughput of the steps since the last log line: images/s of the job, and this rank's
    step time, fraction of time spent waiting for data, model TFLOP/s and MFU."""

    def __init__(self):
        self.start, self.steps, self.samples, self.data_wait = time.perf_counter(), 0, 0, 0.0

    def rates(self, flops_per_sample: int | None, peak_tflops: float | None, world_size: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        rates = {
            "images_per_s": self.samples / elapsed,
            "step_time_ms": 1000 * elapsed / max(self.steps, 1),
            "data_wait_fraction": self.data_wait / elapsed,
        }
        if flops_per_sample:
            rates["model_tflops"] = flops_per_sample * self.samples / world_size / elapsed / 1e12
            if peak_tflops:
                rates["mfu"] = rates["model_tflops"] / peak_tflops
        return rates


class ProgressDisplay:
    """A tqdm bar on a terminal; log lines where the output is a file (SLURM logs)."""

    def __init__(self, name: str, total: int, initial: int, *, enabled: bool):
        self.name, self.total, self.initial, self.enabled = name, total, initial, enabled
        self.start = self.last_line = time.monotonic()
        self.interval = float(os.environ.get(PROGRESS_SECONDS_ENV, "60"))
        self.bar = tqdm(total=total, initial=initial, desc=name, leave=False) if enabled and _terminal() else None

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def reset(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log_step(self, step: int, values: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                img_s=f"{values['images_per_s']:.0f}",
                wait=f"{values['data_wait_fraction']:.0%}",
                refresh=False,
            )
            self.update(step)
            return
        now = time.monotonic()
        if not self.enabled or (now - self.last_line < self.interval and step != self.total):
            return
        self.last_line, elapsed = now, now - self.start
        eta = elapsed / max(step - self.initial, 1) * (self.total - step)
        log.info(
            "%s: step %d/%d, loss %.4g, %.1f images/s, data wait %.0f%%, elapsed %s, ETA %s",
            self.name,
            step,
            self.total,
            values["loss"],
            values["images_per_s"],
            100 * values["data_wait_fraction"],
            clock(elapsed),
            clock(eta),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Countdown:
    """Progress of one phase of a job that is not a training loop (evaluate's feature passes,
    its likelihood ODE), as log lines wherever the output goes: one when the phase starts, then
    ``done/total`` with elapsed time and ETA at most every ``LATENTPIPE_PROGRESS_SECONDS``, and
    one when it ends. ``total`` is in ``unit``s; progress may be fractional (an ODE's time)."""

    def __init__(self, name: str, total: float, unit: str):
        self.name, self.total, self.unit, self.done = name, total, unit, 0.0
        self.start = self.last_line = time.monotonic()
        self.interval = float(os.environ.get(PROGRESS_SECONDS_ENV, "60"))
        log.info("%s: %s %s ...", name, _amount(total), unit)

    def update(self, done: float) -> None:
        self.done, now = done, time.monotonic()
        if now - self.last_line < self.interval or done >= self.total:
            return
        self.last_line, elapsed = now, now - self.start
        eta = elapsed / done * (self.total - done) if done > 0 else math.inf
        log.info(
            "%s: %s/%s %s, elapsed %s, ETA %s",
            self.name,
            _amount(done),
            _amount(self.total),
            self.unit,
            clock(elapsed),
            clock(eta) if math.isfinite(eta) else "?",
        )

    def finish(self, note: str = "") -> None:
        log.info("%s: done in %s%s", self.name, clock(time.monotonic() - self.start), f" ({note})" if note else "")


def _amount(value: float) -> str:
    return f"{value:d}" if isinstance(value, int) else f"{value:.2f}"


def _terminal() -> bool:
    return sys.stderr.isatty()


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    seconds = round(seconds) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
