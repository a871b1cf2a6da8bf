"""Stage artifacts: what a stage made, from what, with which config.

Each stage writes ``<runs_dir>/<experiment>/<stage>/manifest.json`` last and atomically. A
downstream stage trusts an upstream directory only through its manifest: it must exist, be
``complete``, and agree with every other upstream it was made from (hashes of the input
manifests are recorded and compared).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from pipeline import atomic, config
from pipeline.atomic import sha256_file
from pipeline.errors import LatentpipeError, StageInterrupted

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
RUNNING, COMPLETE, FAILED, INTERRUPTED = "running", "complete", "failed", "interrupted"
_VERSIONED = ("torch", "torchvision", "numpy", "pillow", "webdataset", "accelerate", "deepspeed", "timm")


class StageInputError(LatentpipeError):
    """An upstream artifact is missing, unfinished, or from a different upstream run."""


class StageBusyError(LatentpipeError):
    """Another process holds the stage directory's lock."""


_VERIFIED: dict[tuple[str, int, int, str], None] = {}
"""Files this process found equal to a recorded sha256: (path, size, mtime_ns, sha256). A file
is hashed once per process; rewriting it changes its mtime and so hashes it again."""


def verify_file(path: Path, size: int, sha256: str | None, stage: str) -> Path:
    """``path`` after checking its size and (when recorded) sha256, streamed and once per process;
    a missing or different file is a :class:`StageInputError` naming it and the stage to rerun."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        raise StageInputError(f"{path} is missing (recorded by stage '{stage}'): rerun `latentpipe {stage}`") from None
    key = (str(Path(path).resolve()), found.st_size, found.st_mtime_ns, sha256 or "")
    if key in _VERIFIED:
        return path
    if found.st_size != size or (sha256 is not None and sha256_file(path) != sha256):
        what = f"size {found.st_size}, recorded {size}" if found.st_size != size else "sha256 differs"
        raise StageInputError(
            f"{path} is not the file stage '{stage}' recorded ({what}): it changed after the stage "
            f"finished; rerun `latentpipe {stage}`"
        )
    _VERIFIED[key] = None
    return path


def describe_file(path: Path, root: Path, **extra: Any) -> dict:
    """An output entry: path relative to the stage directory, size and sha256 (every later
    reader checks both, :func:`verify_file`)."""
    entry: dict[str, Any] = {
        "path": str(path.relative_to(root)),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    return {**entry, **extra}


def library_versions() -> dict:
    versions = {"python": platform.python_version(), "latentpipe": _version("latentpipe")}
    for name in _VERSIONED:
        if (found := _version(name)) is not None:
            versions[name] = found
    return versions


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the latentpipe checkout in use (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageInputError(f"{path} is not valid JSON ({err}); rerun that stage") from None


def manifest_hash(stage_dir: Path) -> str:
    return sha256_file(Path(stage_dir) / MANIFEST)


def write(stage_dir: Path, manifest: dict) -> None:
    atomic.write_text(Path(stage_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_complete(cfg: config.Config, stage: str) -> tuple[dict, str]:
    """A stage's manifest and its hash, refused unless it exists and is ``complete``."""
    directory = cfg.stage_dir(stage)
    found = read(directory)
    if found is None:
        raise StageInputError(f"stage '{stage}' has no manifest in {directory}: run `latentpipe {stage}` first")
    if found.get("status") != COMPLETE:
        raise StageInputError(
            f"stage '{stage}' in {directory} is {found.get('status')!r}, not complete: rerun `latentpipe {stage}`"
        )
    return found, manifest_hash(directory)


def check_upstreams(cfg: config.Config, stage: str, found: dict, current: dict[str, str] | None = None) -> None:
    """Refuse ``stage`` (manifest ``found``) when it was made from another upstream output than the
    current one: each recorded input manifest hash must equal the upstream's hash now
    (``current``: only these upstreams, with these hashes; default: every recorded one, read
    from disk, a missing upstream counting as different)."""
    for upstream, recorded in found.get("inputs", {}).items():
        if current is not None and upstream not in current:
            continue
        now = current[upstream] if current is not None else _hash_if_present(cfg.stage_dir(upstream))
        if now != recorded:
            raise StageInputError(
                f"stage '{stage}' was made from a different '{upstream}' "
                f"(recorded manifest {recorded[:12]}, current {(now or 'missing')[:12]}): "
                f"rerun `latentpipe {stage}` or restore the matching '{upstream}' output"
            )


def _hash_if_present(stage_dir: Path) -> str | None:
    return manifest_hash(stage_dir) if (Path(stage_dir) / MANIFEST).is_file() else None


def check_inputs(cfg: config.Config, inputs: Sequence[str]) -> dict[str, str]:
    """Manifest hashes of the upstream stages, after checking they exist, are complete and agree.

    Two upstreams agree when every one that was made from another recorded that other's
    current manifest hash (e.g. the encode stage made from an autoencoder trained on older
    shards than the prepare stage now holds is refused).
    """
    manifests, hashes = {}, {}
    for name in inputs:
        manifests[name], hashes[name] = read_complete(cfg, name)
    for name, found in manifests.items():
        check_upstreams(cfg, name, found, hashes)
    return hashes


def up_to_date(cfg: config.Config, stage: str, sections: Sequence[str], inputs: Sequence[str]) -> tuple[bool, str]:
    """Whether a stage's existing output can be reused, and why (not)."""
    found = read(cfg.stage_dir(stage))
    if found is None:
        return False, "no manifest"
    if found.get("status") != COMPLETE:
        return False, f"status {found.get('status')}"
    wanted = config.section_hash(cfg, sections)
    if found.get("config_hash") != wanted:
        return False, f"config changed ({found.get('config_hash', '')[:12]} -> {wanted[:12]})"
    for name in inputs:
        directory = cfg.stage_dir(name)
        if not (directory / MANIFEST).is_file():
            return False, f"input '{name}' missing"
        if found.get("inputs", {}).get(name) != manifest_hash(directory):
            return False, f"input '{name}' changed"
    return True, "complete"


class Publishable(Protocol):
    """A stage output description (a ``pipeline.artifacts.Artifact``)."""

    def to_manifest(self) -> dict[str, Any]: ...


class DamageCounter(Protocol):
    """A shard reader that counts the damaged shards it skipped (``pipeline.data.stream.ShardLoader``)."""

    damaged_shards: dict[str, dict[str, Any]]


@dataclass
class StageRecord:
    """What a running stage reports into its manifest."""

    directory: Path
    inputs: dict = field(default_factory=dict)  # upstream stage -> manifest hash
    outputs: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    readers: list = field(default_factory=list)

    def add_output(self, path: Path, **extra: Any) -> None:
        self.outputs.append(describe_file(Path(path), self.directory, **extra))

    def publish(self, artifact: Publishable) -> None:
        """Describe the output in the manifest: the artifact's top-level keys (pipeline.artifacts)."""
        self.extra.update(artifact.to_manifest())

    def watch(self, reader: DamageCounter) -> None:
        """Record ``reader``'s damaged shards in the manifest (``damaged_shards``: per shard, its
        first error and how many reads met it), whether the stage completes or not."""
        self.readers.append(reader)

    def damaged_shards(self) -> dict[str, dict[str, Any]]:
        return {url: dict(seen) for reader in self.readers for url, seen in reader.damaged_shards.items()}


REFUSALS = (StageInputError, config.ConfigError)
"""Errors that refuse a command (unusable inputs, a config that cannot work): raised by a stage
before it changes its outputs, they leave the stage's manifest and config exactly as they were."""


@contextlib.contextmanager
def stage_lock(directory: Path, stage: str) -> Iterator[None]:
    """Hold the stage directory's lock (``fcntl.lockf`` on ``<directory>/.lock``, released by the
    kernel when the process exits, however it exits). The lock file names its holder (host,
    PID); a held lock is a :class:`StageBusyError` naming them. A holder that died leaves only
    its name behind: the lock is free, taken over, and the takeover is logged."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise StageBusyError(
                f"stage '{stage}' in {directory} is locked by {holder}: another run of it is in "
                f"progress; wait for it to end (or stop it) and rerun"
            ) from None
        if stale := os.pread(fd, 4096, 0).decode(errors="replace").strip():
            log.warning("%s: taking over the lock of %s, which ended without releasing it", directory / LOCK, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {_now()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder's name behind
    finally:
        os.close(fd)


def _snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _restore(path: Path, content: bytes | None) -> None:
    if content is None:
        path.unlink(missing_ok=True)
    else:
        atomic.write_bytes(path, content)


@contextlib.contextmanager
def stage_run(
    cfg: config.Config, stage: str, sections: Sequence[str], inputs: Sequence[str] = (), *, is_main: bool = True
) -> Iterator[StageRecord]:
    """Lock the stage directory, check inputs, mark the stage running, save the resolved
    config; on exit, write the manifest.

    The manifest is written last: ``complete`` only when the body finished, ``failed`` (with
    the error) when it raised. A manifest from an earlier complete run is replaced by
    ``running`` first, so a crash never leaves stale outputs looking complete. A command
    refused (:data:`REFUSALS`, before or inside the body) changes nothing: the earlier manifest
    and config are put back byte for byte. A stage stopped on purpose
    (:class:`StageInterrupted`) is ``interrupted``: rerunning it resumes. Only the main rank
    (``is_main``) locks and writes; the others check the inputs and fill their record unused.
    """
    directory = cfg.stage_dir(stage)
    if not is_main:
        yield StageRecord(directory, inputs=check_inputs(cfg, inputs))
        return
    with stage_lock(directory, stage):
        record = StageRecord(directory, inputs=check_inputs(cfg, inputs))
        before = {name: _snapshot(directory / name) for name in (MANIFEST, "config.yaml")}
        atomic.write_text(directory / "config.yaml", config.to_yaml(cfg))
        manifest = {
            "stage": stage,
            "run_id": uuid.uuid4().hex,  # two runs never share a manifest hash, even within a second
            "status": RUNNING,
            "config_hash": config.section_hash(cfg, sections),
            "inputs": record.inputs,
            "outputs": [],
            "metrics": {},
            "versions": library_versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "started_at": _now(),
            "finished_at": None,
        }
        write(directory, manifest)
        try:
            yield record
        except REFUSALS:
            for name, content in before.items():
                _restore(directory / name, content)
            raise
        except BaseException as err:
            status = INTERRUPTED if isinstance(err, (StageInterrupted, KeyboardInterrupt)) else FAILED
            manifest.update(
                status=status,
                error=f"{type(err).__name__}: {err}",
                finished_at=_now(),
                damaged_shards=record.damaged_shards(),
            )
            write(directory, manifest)
            raise
        manifest.update(
            status=COMPLETE,
            outputs=record.outputs,
            metrics=record.metrics,
            finished_at=_now(),
            damaged_shards=record.damaged_shards(),
            **record.extra,
        )
        write(directory, manifest)
        log.info("%s: complete (%s)", stage, directory / MANIFEST)
