"""Streaming WebDataset shards to any number of ranks and workers, with exact resume.

Layout. Each rank runs ``num_workers`` DataLoader workers; rank ``r``'s worker slot ``v`` is the
global slot ``g = r * W + v`` of ``R * W``. Every epoch the shard list is permuted by
``(seed, epoch)`` and slot ``g`` reads shards ``g, g + R*W, ...``; with fewer shards than slots
every slot reads all shards and keeps samples ``g, g + R*W, ...`` (never zero shards for a rank).

Equal length. An epoch is exactly ``N = samples_per_epoch // (R * B)`` batches on every rank,
so no rank waits in a collective for one that ran out: a slot with less data than its share
wraps around its shards (reshuffled), one with more stops early (webdataset's ``with_epoch``
idea, made exact). Batch ``i`` of rank ``r`` comes from slot ``i mod W`` and is that slot's
``i // W``-th batch: the batch sequence of a rank is a pure function of (seed, epoch, layout).

Exact resume. :meth:`ShardLoader.state_dict` is (epoch, batches consumed on this rank, decode
failures per slot). A restored loader re-reads its slots from the epoch start and skips what
was consumed, so its next batches are exactly those an uninterrupted loader would have
yielded (same keys, same augmentations: each sample's randomness comes from
``(seed, epoch, slot, index)``). Skipping reads bytes but decodes only when needed.

Elastic resume. :meth:`ShardLoader.resume` takes every rank's state of a checkpoint. Under
another number of ranks or workers the rest of the epoch is every sample not yet consumed, each
once (:class:`_Rest`); the consumed ones are replayed from the saved positions, which stay a
few numbers per rank whatever the world size. Each pass of a slot over its shards is shuffled
on its own, so with balanced shards an epoch sees every sample exactly once.

Sources: local paths, directories, brace patterns (``shards/train-{000000..000009}.tar``),
``http(s)://`` URLs and ``pipe:`` commands (e.g. ``pipe:aws s3 cp s3://bucket/x.tar -``), read by
pipeline.data.reader (samples of a shard), pipeline.data.tar (the tar format) and
pipeline.data.remote (addresses, deadlines).

Damage. A damaged shard (cut short, corrupt, a short HTTP body, a missed transfer deadline) keeps
the samples before the damage; the rest of it is skipped, warned about once and counted per
shard in :attr:`ShardLoader.damaged_shards` (or raised with ``on_error="raise"``).

Signals. DataLoader workers ignore SIGTERM, SIGINT and SIGUSR1, so a signal to the whole process
group (SLURM preemption, ``timeout``, Ctrl-C) reaches only the main process, which checkpoints.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.data import transforms
from pipeline.data.reader import (
    SHARD_DEADLINE,
    DamagedShardError,
    SampleDecodeError,
    count_samples,
    decode_sample,
    read_shard,
)
from pipeline.data.remote import StreamError, TransferError, expand_urls
from pipeline.seeding import generator, python_rng

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Signals meant for the training process, which checkpoints on them; workers ignore them."""


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: SLURM, ``timeout`` and Ctrl-C signal the whole process group, and a
    worker killed by one fails the main process before it can checkpoint. Workers still end when
    the loader shuts them down or their parent dies (torch's worker watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Workers forked in this block start with the stop signals blocked (pending, not lost) until
    :func:`_ignore_stop_signals` ignores them; the main process receives its own on leaving."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def endless(loader: ShardLoader) -> Iterator[dict]:
    """Batches epoch after epoch (each ``iter(loader)`` continues where the last stopped)."""
    while True:
        yield from loader


def collate(samples: list[dict]) -> dict:
    """Stack tensors and ints; keep everything else as lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def shuffled(samples: Iterator[dict], buffer_size: int, rng) -> Iterator[dict]:
    """Reservoir-style shuffle buffer (as webdataset's ``shuffle``), driven by ``rng``."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Who reads what: the inputs that fix the order of every rank's batches."""

    num_shards: int
    samples_per_epoch: int
    batch_size: int
    rank: int
    world_size: int
    num_workers: int  # DataLoader workers per rank (0: read in the main process)
    seed: int

    @property
    def slots_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.slots_per_rank

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // (self.world_size * self.batch_size)

    def slot_batches(self, slot: int) -> int:
        """Batches slot ``slot`` of this rank produces per epoch (batch i belongs to slot i mod W)."""
        return len(range(slot, self.batches_per_epoch, self.slots_per_rank))

    def check(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise StreamError(f"rank {self.rank} is not in [0, {self.world_size})")
        if self.batches_per_epoch == 0:
            raise StreamError(
                f"{self.samples_per_epoch} samples make no full batch of {self.batch_size} on "
                f"{self.world_size} rank(s): lower the batch size or add data"
            )


def slot_shards(urls: Sequence[str], layout: Layout, epoch: int, global_slot: int, wrap: int = 0) -> list[str]:
    """The shards global slot ``global_slot`` reads in ``epoch`` (``wrap`` > 0: its re-reads).

    Pass 0 of an epoch gives the slots disjoint shards covering the set once; with fewer shards
    than slots every slot gets all of them (and keeps every num_slots-th sample).
    """
    order = python_rng(layout.seed, "shards", epoch, wrap).sample(list(urls), len(urls))
    return order if len(urls) < layout.num_slots else order[global_slot :: layout.num_slots]


class _Rest:
    """The rest of an epoch after the layout changed (resume on another number of ranks or
    workers): the samples not consumed by the earlier segments of the epoch, in the epoch's
    global order (shards permuted by (seed, epoch), samples in tar order), rank ``r`` of ``R``
    taking every R-th one through a shuffle buffer. A segment is (layout, per-rank batches and
    failures); segment 0 used the slot streams of :class:`_EpochSlice`, later ones these streams.
    Which samples a segment consumed is replayed from that description (bytes read, nothing
    decoded), so the position is independent of the world size and stays small."""

    def __init__(self, urls: Sequence[str], seed: int, epoch: int, history: list[dict], options: dict):
        self.urls, self.seed, self.epoch, self.history, self.options = list(urls), seed, epoch, history, options
        self.consumed: set[tuple[str, str]] = set()
        for index, segment in enumerate(history):
            self.consumed |= self._consumed_by(index, segment)
        lay = Layout(**{**history[-1]["layout"], "rank": 0})
        self.remaining = lay.samples_per_epoch - len(self.consumed)
        self.batches = 0  # per rank, set by ShardLoader for its layout

    def _consumed_by(self, index: int, segment: dict) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        ranks = segment["ranks"]
        for rank, done in enumerate(ranks):
            lay = Layout(**{**segment["layout"], "rank": rank})
            if index == 0:
                for slot in range(lay.slots_per_rank):
                    taken = len(range(slot, done["batches"], lay.slots_per_rank)) * lay.batch_size
                    taken += done["failures"][slot] if taken else 0
                    piece = _EpochSlice(self.urls, lay, self.epoch, 0, [0] * lay.slots_per_rank, self.options)
                    global_slot = rank * lay.slots_per_rank + slot
                    found.update(_identity(raw) for raw in itertools.islice(piece._raw(global_slot), taken))
            else:
                earlier = _Rest(self.urls, self.seed, self.epoch, self.history[:index], self.options)
                taken = done["batches"] * lay.batch_size + (max(done["failures"]) if done["batches"] else 0)
                stream = earlier.stream(rank, len(ranks), [])
                found.update(_identity(raw) for raw in itertools.islice(stream, taken))
        return found

    def stream(self, rank: int, world_size: int, damage: list[tuple[str, str]]) -> Iterator[dict]:
        """Rank ``rank``'s raw samples of the rest of the epoch (``damage`` collects damaged shards)."""
        rng = python_rng(self.seed, "shuffle-rest", self.epoch, len(self.history), rank)
        return shuffled(self._mine(rank, world_size, damage), self.options["shuffle_buffer"], rng)

    def _mine(self, rank: int, world_size: int, damage: list[tuple[str, str]]) -> Iterator[dict]:
        position = 0
        for url in python_rng(self.seed, "shards", self.epoch, 0).sample(self.urls, len(self.urls)):
            try:
                for raw in read_shard(url, self.options["timeout"], self.options["deadline"]):
                    if _identity(raw) in self.consumed:
                        continue
                    position += 1
                    if (position - 1) % world_size == rank:
                        yield raw
            except (DamagedShardError, TransferError, OSError) as err:
                if self.options["on_error"] == "raise":
                    raise
                damage.append((url, str(err)))


def _identity(raw: dict) -> tuple[str, str]:
    return raw["__url__"], raw["__key__"]


class _EpochSlice(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch from batch ``start`` on; DataLoader worker w serves slot
    (start + w) mod W so that the DataLoader's round-robin order is the rank's batch order."""

    def __init__(
        self,
        urls,
        layout: Layout,
        epoch: int,
        start: int,
        failures: list[int],
        options: dict,
        rest: _Rest | None = None,
    ):
        self.urls, self.layout, self.epoch, self.start = urls, layout, epoch, start
        self.failures, self.options, self.rest = failures, options, rest
        self.damage: list[tuple[str, str]] = []  # (url, error) found since the last batch

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        lay = self.layout
        if self.rest is not None:
            yield from self._rest_batches(worker, self.rest)
            return
        slot = (self.start + worker) % lay.slots_per_rank
        skip_batches = (self.start + worker) // lay.slots_per_rank
        yield from self._slot_batches(slot, skip_batches)

    def _rest_batches(self, worker: int, rest: _Rest) -> Iterator[tuple[dict, dict]]:
        """After a layout change: this rank's batches of the rest of the epoch. Every worker reads
        the rank's whole stream (decoding it, since an undecodable sample shifts the batches) and
        yields batches ``start + worker``, ``start + worker + W``, ...; their failure count is the
        stream's (the same in every worker)."""
        lay, opts = self.layout, self.options
        failures, index = 0, 0
        batch: list[dict] = []
        for raw in rest.stream(lay.rank, lay.world_size, self.damage):
            if index >= rest.batches:
                return
            try:
                sample = decode_sample(raw, opts["with_meta"])
            except SampleDecodeError as err:
                if opts["on_error"] == "raise":
                    raise
                failures += 1
                log.warning("skipping undecodable %s", err)
                continue
            mine = index >= self.start and (index - self.start) % lay.slots_per_rank == worker
            if mine and "image" in sample and (opts["flip"] or opts["crop"]):
                gen = generator(lay.seed, "augment-rest", self.epoch, len(rest.history), lay.rank, index, len(batch))
                sample["image"] = transforms.augment(sample["image"], gen, opts["flip"], opts["crop"])
            batch.append(sample)
            if len(batch) == lay.batch_size:
                if mine:
                    yield collate(batch), {"slot": worker, "failures": failures, "damage": self.damage}
                    self.damage = []
                batch, index = [], index + 1

    def _raw(self, global_slot: int) -> Iterator[dict]:
        """This slot's raw samples for the epoch through the shuffle buffer, wrapping around
        (reshuffled) as needed. Each pass over the slot's shards is shuffled on its own, so the
        first pass yields each of its samples once before any re-read (a buffer spanning passes
        would repeat some samples of the epoch and skip others)."""
        lay, opts = self.layout, self.options
        for wrap in itertools.count():
            # pass 0 keeps the seed of the single buffer this replaced: the same order until its end
            rng = python_rng(lay.seed, "shuffle", self.epoch, global_slot, *([wrap] if wrap else []))
            yield from shuffled(self._pass(global_slot, wrap), opts["shuffle_buffer"], rng)

    def _pass(self, global_slot: int, wrap: int) -> Iterator[dict]:
        """One pass over the slot's shards (samples in tar order)."""
        lay, opts = self.layout, self.options
        by_sample = len(self.urls) < lay.num_slots
        mine = slot_shards(self.urls, lay, self.epoch, global_slot, wrap)
        produced = 0
        index = 0
        for url in mine:
            try:
                for sample in read_shard(url, opts["timeout"], opts["deadline"]):
                    index += 1
                    if by_sample and (index - 1) % lay.num_slots != global_slot:
                        continue
                    produced += 1
                    yield sample
            except (DamagedShardError, TransferError, OSError) as err:
                if opts["on_error"] == "raise":
                    raise
                self.damage.append((url, str(err)))
        if produced == 0:
            raise StreamError(
                f"rank {lay.rank} slot {global_slot % lay.slots_per_rank} read no samples from "
                f"{len(mine)} shard(s) {mine[:3]}: the shards are empty or unreadable"
            )

    def _slot_batches(self, slot: int, skip_batches: int) -> Iterator[tuple[dict, dict]]:
        lay, opts = self.layout, self.options
        global_slot = lay.rank * lay.slots_per_rank + slot
        failures = 0
        stream = self._raw(global_slot)
        to_skip = skip_batches * lay.batch_size
        must_decode_skipped = self.failures[slot] > 0  # failures shift the stream: replay them
        index = 0  # decoded samples of this slot in this epoch: fixes each one's augmentation
        batch: list[dict] = []
        remaining = lay.slot_batches(slot) - skip_batches
        if remaining <= 0:
            return
        for raw in stream:
            skipping = index < to_skip
            if skipping and not must_decode_skipped:
                index += 1
                continue
            try:
                sample = decode_sample(raw, opts["with_meta"])
            except SampleDecodeError as err:
                if opts["on_error"] == "raise":
                    raise
                failures += 1
                log.warning("skipping undecodable %s", err)
                continue
            index += 1
            if skipping:
                continue
            if "image" in sample and (opts["flip"] or opts["crop"]):
                gen = generator(lay.seed, "augment", self.epoch, global_slot, index)
                sample["image"] = transforms.augment(sample["image"], gen, opts["flip"], opts["crop"])
            batch.append(sample)
            if len(batch) == lay.batch_size:
                # damage met while filling this batch travels with it; nothing is read after the last
                yield collate(batch), {"slot": slot, "failures": failures, "damage": self.damage}
                self.damage = []
                batch = []
                remaining -= 1
                if remaining == 0:
                    return


class ShardLoader:
    """Batches of a shard set for one rank; iterate once per epoch; checkpoint with state_dict()."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        flip: bool = False,
        crop: int | None = None,
        on_error: str = "skip",
        timeout: float = 30.0,
        deadline: float = SHARD_DEADLINE,
        with_meta: bool = False,
    ):
        """``timeout``: seconds one remote read may stall; ``deadline``: seconds one shard's whole
        transfer may take; ``on_error``: "skip" (and count) or "raise" on damaged shards and
        undecodable samples."""
        self.urls = expand_urls(urls)
        if samples_per_epoch is None:
            samples_per_epoch = count_samples(self.urls, timeout, deadline)
        self.layout = Layout(len(self.urls), samples_per_epoch, batch_size, rank, world_size, num_workers, seed)
        self.layout.check()
        if len(self.urls) < self.layout.num_slots:
            log.info(
                "%d shards for %d reader slots: every slot reads all shards and keeps its share "
                "of samples; write more shards for less I/O",
                len(self.urls),
                self.layout.num_slots,
            )
        self.options = {
            "shuffle_buffer": shuffle_buffer,
            "flip": flip,
            "crop": crop,
            "on_error": on_error,
            "timeout": timeout,
            "deadline": deadline,
            "with_meta": with_meta,
        }
        self.epoch = 0
        self.batches = 0
        self.failures = [0] * self.layout.slots_per_rank  # this epoch, per slot: for resume
        self.undecodable_samples = 0  # since construction
        self.damaged_shards: dict[str, dict[str, Any]] = {}
        """Per damaged shard: its first error and how many reads of it found the damage (a shard
        is re-read by every slot that reads it and in every epoch); for the stage's manifest."""
        self.history: list[dict] = []  # earlier segments of this epoch, under other layouts (see _Rest)
        self._rest: _Rest | None = None

    def __len__(self) -> int:
        return self.batches_in_epoch

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch on this rank (fewer in the rest of an epoch begun under
        another layout)."""
        return self.layout.batches_per_epoch if self._rest is None else self._rest.batches

    @property
    def skipped(self) -> dict[str, int]:
        """Undecodable samples and distinct damaged shards met since construction."""
        return {"undecodable_samples": self.undecodable_samples, "damaged_shards": len(self.damaged_shards)}

    def _record_damage(self, url: str, error: str) -> None:
        seen = self.damaged_shards.setdefault(url, {"error": error, "reads": 0})
        seen["reads"] += 1
        if seen["reads"] == 1:  # once per shard, not once per slot, wrap-around and epoch
            log.warning("%s; skipping the rest of this shard (warned once, counted in damaged_shards)", error)

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; the next iteration starts the next epoch."""
        lay = self.layout
        dataset = _EpochSlice(self.urls, lay, self.epoch, self.batches, list(self.failures), self.options, self._rest)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=lay.num_workers,
            multiprocessing_context="fork" if lay.num_workers else None,
            worker_init_fn=_ignore_stop_signals if lay.num_workers else None,
        )
        with _stop_signals_blocked():
            batches = iter(loader)  # forks the workers
        for batch, meta in batches:
            slot = meta["slot"]
            self.batches += 1
            # a slot's count is its own stream's; in the rest of an epoch all workers share one stream
            before = self.failures[slot] if self._rest is None else max(self.failures)
            self.undecodable_samples += meta["failures"] - before
            self.failures[slot] = meta["failures"]
            for url, error in meta["damage"]:
                self._record_damage(url, error)
            yield batch
        if self.batches != self.batches_in_epoch:  # a worker stopped short: never silently
            raise StreamError(
                f"rank {lay.rank} got {self.batches} of {self.batches_in_epoch} batches in epoch {self.epoch}"
            )
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.batches = 0
        self.failures = [0] * self.layout.slots_per_rank
        self.history, self._rest = [], None

    def state_dict(self) -> dict:
        lay = self.layout
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "samples_seen": self.batches * lay.batch_size,
            "failures": list(self.failures),
            "damaged_shards": {url: dict(seen) for url, seen in self.damaged_shards.items()},
            "history": [dict(segment) for segment in self.history],
            "layout": {
                "num_shards": lay.num_shards,
                "samples_per_epoch": lay.samples_per_epoch,
                "batch_size": lay.batch_size,
                "world_size": lay.world_size,
                "num_workers": lay.num_workers,
                "seed": lay.seed,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()["layout"]
        changed = {k: (v, mine[k]) for k, v in state["layout"].items() if mine.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise StreamError(
                f"cannot resume the data stream exactly: its layout changed ({detail}); "
                f"restore the original settings, or start a new epoch by dropping the loader state"
            )
        self.epoch, self.batches, self.failures = state["epoch"], 0, list(state["failures"])
        self._continue(state.get("history", []))  # states saved before elastic resume lack it
        if not 0 <= state["batches"] <= self.batches_in_epoch:
            raise StreamError(f"loader state has {state['batches']} batches of {self.batches_in_epoch}")
        self.batches = state["batches"]
        # states saved before damaged shards were counted lack the key
        self.damaged_shards = {url: dict(seen) for url, seen in state.get("damaged_shards", {}).items()}

    def resume(self, states: list[dict]) -> None:
        """Continue from the :meth:`state_dict` of every rank of a checkpoint (in rank order),
        written under this layout (then exactly as :meth:`load_state_dict`: bit-identical batches)
        or under another number of ranks or workers. Then the rest of the epoch is every sample
        the earlier ranks did not consume, each once, split over the ranks now (see
        :class:`_Rest`; the rest of that epoch reads every shard once per worker), and the next
        epoch starts under the new layout."""
        lay, old = self.layout, states[0]["layout"]
        mine = self.state_dict()["layout"]
        if old == mine and len(states) == lay.world_size:
            self.load_state_dict(states[lay.rank])
            return
        fixed = ("num_shards", "samples_per_epoch", "batch_size", "seed")
        changed = {k: (old[k], mine[k]) for k in fixed if old[k] != mine[k]}
        if changed:
            detail = ", ".join(f"{k}: {was} -> {now}" for k, (was, now) in changed.items())
            raise StreamError(
                f"cannot continue the data stream: only the number of ranks and workers may change "
                f"between runs ({detail}); restore the original settings"
            )
        history = [dict(segment) for segment in states[0].get("history", [])]
        if states[0]["batches"]:
            history.append(
                {"layout": old, "ranks": [{"batches": s["batches"], "failures": list(s["failures"])} for s in states]}
            )
        self.epoch, self.batches, self.failures = states[0]["epoch"], 0, [0] * lay.slots_per_rank
        # damaged shards, counted per rank, go to rank 0: the stage sums them over ranks
        self.damaged_shards = {}
        for state in states if lay.rank == 0 else []:
            for url, seen in state.get("damaged_shards", {}).items():
                mine_seen = self.damaged_shards.setdefault(url, {"error": seen["error"], "reads": 0})
                mine_seen["reads"] += seen["reads"]
        self._continue(history)
        log.info(
            "data stream: epoch %d continues on %d rank(s) x %d worker(s) with %d batches per rank",
            self.epoch,
            lay.world_size,
            lay.num_workers,
            self.batches_in_epoch,
        )

    def _continue(self, history: list[dict]) -> None:
        """Set the epoch's earlier segments (none: the epoch runs under this layout from its start)."""
        self.history = history
        self._rest = _Rest(self.urls, self.layout.seed, self.epoch, history, self.options) if history else None
        if self._rest is not None:
            self._rest.batches = self._rest.remaining // (self.layout.world_size * self.layout.batch_size)
            if self._rest.batches == 0:  # the earlier ranks consumed the whole epoch
                self._next_epoch()


def sequential_batches(
    urls: str | Sequence[str],
    batch_size: int,
    *,
    timeout: float = 30.0,
    deadline: float = SHARD_DEADLINE,
    with_meta: bool = False,
) -> Iterator[dict]:
    """Every sample of the shards once, in shard order, in batches (the last may be smaller):
    for evaluation and encoding, where order and completeness matter more than shuffling, so a
    damaged shard raises (naming it)."""
    batch: list[dict] = []
    for url in expand_urls(urls):
        for raw in read_shard(url, timeout, deadline):
            batch.append(decode_sample(raw, with_meta))
            if len(batch) == batch_size:
                yield collate(batch)
                batch = []
    if batch:
        yield collate(batch)
