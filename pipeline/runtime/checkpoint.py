"""Checkpoints that a job can resume from bit for bit, written atomically by all ranks.

Layout: ``<dir>/step-00001200/`` holding ``state.pt`` (what every rank shares: model,
optimisers, codebook, step), ``rank-00000.pt`` ... (what each rank owns: under DeepSpeed ZeRO
its optimiser partition), ``elastic.pt`` (only where ranks own state: what a job on another number
of ranks loads instead of the rank files, e.g. the ZeRO optimiser state gathered into whole
tensors) and ``complete.json``, which records each file's size and sha256. The ranks write
into ``.step-00001200.tmp/`` and the main rank renames it when everyone is done, so a ``step-*``
directory is always complete. On resume every file is checked against ``complete.json`` (torch
does not check its zip CRCs: flipped bytes would load) and loaded with
``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import IO, Any, cast

import torch

from pipeline import atomic
from pipeline.atomic import sha256_file
from pipeline.errors import LatentpipeError
from pipeline.runtime.dist import Runtime

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{8})$")
ELASTIC = "elastic.pt"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class CheckpointError(LatentpipeError):
    """A checkpoint cannot be written (disk full, state that torch cannot save) or read back intact."""


def _write(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically; a full disk or an unsaveable object is a :class:`CheckpointError`
    naming the file (torch itself reports a failed write only as ``unexpected pos ...``)."""
    writer: _WriteErrors | None = None
    try:
        with atomic.atomic_open(path) as handle:
            writer = _WriteErrors(handle)
            torch.save(state, cast(IO[bytes], writer))  # torch needs only write and flush
    except (pickle.PicklingError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"cannot write checkpoint {path}: the state holds an object torch cannot save ({type(err).__name__}: {err})"
        ) from err
    except (OSError, RuntimeError) as err:
        cause = writer.error if isinstance(err, RuntimeError) and writer is not None and writer.error else err
        if not isinstance(cause, OSError):
            raise
        full = cause.errno in atomic.NO_SPACE
        raise CheckpointError(
            f"cannot write checkpoint {path}: {cause.strerror or cause}; "
            + ("free space there (or lower keep_checkpoints) and " if full else "")
            + "rerun the same command to resume from the last checkpoint"
        ) from cause


class _WriteErrors:
    """A writable file that remembers the OSError of a failed write (torch replaces it by a
    RuntimeError without the cause)."""

    def __init__(self, handle: Any):
        self.handle, self.error = handle, cast(OSError | None, None)

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save(
    directory: Path,
    step: int,
    shared: dict[str, Any],
    own: dict[str, Any],
    runtime: Runtime,
    keep: int,
    resume_key: str,
    elastic: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``step`` (collective: every rank calls it) and keep the newest ``keep``.
    ``resume_key`` identifies what the state was trained on (see :func:`set_aside_if_stale`);
    ``elastic`` (main rank) replaces every rank's ``own`` state on another number of ranks."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".step-{step:08d}{atomic.TMP_SUFFIX}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    _write(tmp / _rank_file(runtime.rank), own)
    if runtime.is_main:
        _write(tmp / "state.pt", shared)
        if elastic:
            _write(tmp / ELASTIC, elastic)
    runtime.barrier()
    if runtime.is_main:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.glob("*.pt"))}
        atomic.write_text(
            tmp / "complete.json",
            json.dumps({"step": step, "world_size": runtime.world_size, "resume_key": resume_key, "files": files}),
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(_complete(directory))[:-keep]:
            # complete.json first: a kill mid-prune then leaves an incomplete directory, not a damaged "complete" one
            (old / "complete.json").unlink()
            shutil.rmtree(old, ignore_errors=True)
        for leftover in directory.glob("step-*"):  # a prune killed part-way (saves land whole, via os.replace)
            if _STEP_DIR.match(leftover.name) and not (leftover / "complete.json").is_file():
                shutil.rmtree(leftover, ignore_errors=True)
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
        log.warning(
            "checkpoints in %s come from another config or other inputs; moved to %s, starting afresh", directory, aside
        )
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
        shared: dict[str, Any] | None
        try:
            shared, own = load(path, runtime.rank, runtime.world_size)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, CheckpointError) as err:
            log.warning("checkpoint %s is unreadable (%s); trying the one before", path, err)
            shared = own = None
        if runtime.any(shared is None) or shared is None:  # the second test only narrows the type
            continue
        return path, shared, own
    return None


def load(path: Path, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared state, this rank's own state) of a checkpoint, on CPU. When the checkpoint was
    written by another number of ranks (elastic resume: the shared state carries over, see
    ``TrainState.restore``) the own state is its ``elastic.pt`` (memory-mapped: every rank reads
    the same pages), or None when it has none."""
    meta = json.loads((path / "complete.json").read_text())
    recorded = meta.get("files")  # absent in checkpoints written before files were hashed
    same_ranks = meta["world_size"] == world_size
    own_file = _rank_file(rank) if same_ranks else ELASTIC if (path / ELASTIC).is_file() else None
    for name in ("state.pt", own_file):
        if recorded is not None and name is not None:
            _verify(path / name, recorded.get(name))
    shared = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if not same_ranks:
        log.info("%s was written by %d rank(s); this job has %d", path, meta["world_size"], world_size)
    if own_file is None:
        return shared, None
    return shared, torch.load(path / own_file, map_location="cpu", weights_only=True, mmap=not same_ranks)


def _verify(file: Path, entry: dict[str, Any] | None) -> None:
    if entry is None:
        raise CheckpointError(f"{file} is not listed in its complete.json")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{file} has {size} bytes, {entry['bytes']} when written")
    if sha256_file(file) != entry["sha256"]:
        raise CheckpointError(f"{file} differs from what was written (sha256)")
