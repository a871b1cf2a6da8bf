"""Checkpoints that a job can resume from bit for bit, written atomically by all ranks.

Layout: ``<dir>/step-00001200/`` holding ``state.pt`` (what every rank shares: model,
optimisers, codebook, step), ``rank-00000.pt`` ... (what each rank owns: its data-loader
position) and ``complete.json``. The ranks write into ``.step-00001200.tmp/`` and the main
rank renames it when everyone is done, so a ``step-*`` directory is always complete. Files are
loaded with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline import atomic
from pipeline.runtime.dist import Runtime

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def save(directory: Path, step: int, shared: dict[str, Any], own: dict[str, Any], runtime: Runtime,
         keep: int, resume_key: str) -> Path:
    """Write a checkpoint of ``step`` (collective: every rank calls it) and keep the newest ``keep``.
    ``resume_key`` identifies what the state was trained on (see :func:`set_aside_if_stale`)."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".step-{step:08d}{atomic.TMP_SUFFIX}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    with atomic.atomic_open(tmp / _rank_file(runtime.rank)) as handle:
        torch.save(own, handle)
    if runtime.is_main:
        with atomic.atomic_open(tmp / "state.pt") as handle:
            torch.save(shared, handle)
    runtime.barrier()
    if runtime.is_main:
        atomic.write_text(tmp / "complete.json",
                          json.dumps({"step": step, "world_size": runtime.world_size, "resume_key": resume_key}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(_complete(directory))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def _complete(directory: Path) -> list[Path]:
    return [p for p in directory.glob("step-*") if _STEP_DIR.match(p.name) and (p / "complete.json").is_file()]


def set_aside_if_stale(directory: Path, resume_key: str, runtime: Runtime) -> None:
    """Move checkpoints made under another ``resume_key`` (other config or inputs) to
    ``<directory>.stale`` so the job starts afresh instead of resuming the wrong model."""
    directory = Path(directory)
    found = latest(directory)
    stale = found is not None and json.loads((found / "complete.json").read_text()).get("resume_key") != resume_key
    if stale and runtime.is_main:
        aside = directory.with_name(directory.name + ".stale")
        log.warning("checkpoints in %s come from another config or other inputs; moved to %s, starting afresh",
                    directory, aside)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)
    runtime.barrier()


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint; unfinished ones are reported and ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for partial in directory.glob(f".step-*{atomic.TMP_SUFFIX}"):
        log.warning("ignoring incomplete checkpoint %s (interrupted while saving)", partial)
    found = sorted(_complete(directory))
    return found[-1] if found else None


def load_latest(directory: Path, runtime: Runtime) -> tuple[Path, dict[str, Any], dict[str, Any] | None] | None:
    """(path, shared, own) of the newest complete checkpoint that every rank can read; one with
    an unreadable file (truncated or corrupted after it was written) is reported and skipped in
    favour of the one before. None when there is none."""
    for path in sorted(_complete(Path(directory)), reverse=True):
        try:
            shared, own = load(path, runtime.rank, runtime.world_size)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            log.warning("checkpoint %s is unreadable (%s); trying the one before", path, err)
            shared = own = None
        if runtime.any(shared is None):
            continue
        return path, shared, own
    return None


def load(path: Path, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared state, this rank's own state) of a checkpoint, on CPU. The own state is None when
    the checkpoint was written by another number of ranks (elastic resume: the shared state
    carries over, see ``TrainState.restore``)."""
    meta = json.loads((path / "complete.json").read_text())
    shared = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if meta["world_size"] != world_size:
        log.info("%s was written by %d rank(s); this job has %d", path, meta["world_size"], world_size)
        return shared, None
    own = torch.load(path / _rank_file(rank), map_location="cpu", weights_only=True)
    return shared, own
