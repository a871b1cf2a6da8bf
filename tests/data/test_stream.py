"""The streaming loader: splitting, equal epochs, exact resume, damage, HTTP."""

import functools
import http.server
import io
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import shards
from pipeline.data.reader import DamagedShardError, SampleDecodeError
from pipeline.data.stream import Layout, ShardLoader, StreamError, slot_shards


def _png(value, size=6):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_shards(directory, sizes, corrupt=()):
    """Shards holding sizes[i] samples each; keys are globally unique; ``corrupt`` keys get bad PNGs."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for index, size in enumerate(sizes):
        with shards.ShardWriter(directory, "train", max_count=10**6, max_bytes=1 << 30, first_index=index) as w:
            for _ in range(size):
                key = f"s{n:05d}"
                data = b"not a png" if key in corrupt else _png(n, size=8)
                w.write({"__key__": key, "png": data, "cls": str(n % 10).encode()})
                n += 1
    return sorted(str(p) for p in directory.glob("train-*.tar"))


def _keys(loader, limit=None):
    out = []
    for batch in loader:
        out.append(tuple(batch["key"]))
        if limit is not None and len(out) == limit:
            break
    return out


def test_slots_get_disjoint_shards_covering_the_set_once_per_epoch():
    urls = [f"s{i}.tar" for i in range(23)]
    for world, workers in [(1, 1), (2, 1), (3, 2), (4, 3)]:
        for epoch in range(3):
            seen = []
            for rank in range(world):
                layout = Layout(len(urls), 1000, 4, rank, world, workers, seed=7)
                for worker in range(layout.slots_per_rank):
                    mine = slot_shards(urls, layout, epoch, rank * layout.slots_per_rank + worker)
                    assert mine, "no rank or worker reads zero shards"
                    seen += mine
            assert sorted(seen) == sorted(urls)
    layout = Layout(len(urls), 1000, 4, 0, 2, 1, seed=7)
    assert slot_shards(urls, layout, 0, 0) != slot_shards(urls, layout, 1, 0), "reshuffled per epoch"


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_give_every_rank_the_same_batch_count(tmp_path, workers):
    urls = _write_shards(tmp_path, [3, 40, 5, 1, 17])  # 66 samples, very uneven
    world, batch = 2, 4
    per_rank = []
    for rank in range(world):
        loader = ShardLoader(
            urls, batch_size=batch, rank=rank, world_size=world, num_workers=workers, shuffle_buffer=8, seed=1
        )
        epochs = [_keys(loader) for _ in range(2)]
        per_rank.append(epochs)
        assert [len(e) for e in epochs] == [66 // (world * batch)] * 2
        assert all(len(k) == batch for e in epochs for k in e)
    counts = Counter(k for rank in per_rank for batch_keys in rank[0] for k in batch_keys)
    assert len(counts) >= 0.6 * 66, "ranks read mostly distinct samples"


def test_fewer_shards_than_slots_splits_by_sample(tmp_path):
    urls = _write_shards(tmp_path, [30])
    keys = [
        {
            k
            for b in _keys(ShardLoader(urls, batch_size=3, rank=r, world_size=2, num_workers=2, shuffle_buffer=4))
            for k in b
        }
        for r in range(2)
    ]
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_rank_output_does_not_depend_on_reading_in_workers_or_main_process(tmp_path):
    urls = _write_shards(tmp_path, [12, 9, 15, 7])
    kwargs = dict(batch_size=4, rank=1, world_size=2, shuffle_buffer=6, seed=3)
    # one worker reading in a subprocess or in the main process: the same slot, the same batches
    assert _keys(ShardLoader(urls, num_workers=1, **kwargs)) == _keys(ShardLoader(urls, num_workers=0, **kwargs))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_yields_the_uninterrupted_batches(tmp_path, workers):
    urls = _write_shards(tmp_path, [11, 23, 7, 19, 14])
    make = functools.partial(
        ShardLoader,
        urls,
        batch_size=4,
        rank=0,
        world_size=2,
        num_workers=workers,
        shuffle_buffer=10,
        seed=5,
        flip=True,
        crop=6,
    )
    uninterrupted = make()
    reference = []
    for _ in range(2):
        reference += [(tuple(b["key"]), b["image"].clone()) for b in uninterrupted]
    for stop in (1, 4, 5, len(uninterrupted) + 2):
        first = make()
        consumed = []
        while len(consumed) < stop:
            for b in first:
                consumed.append(tuple(b["key"]))
                if len(consumed) == stop:
                    break
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        rest = []
        while len(consumed) + len(rest) < len(reference):
            rest += [(tuple(b["key"]), b["image"]) for b in resumed]
        assert consumed == [k for k, _ in reference[:stop]]
        for (key, image), (ref_key, ref_image) in zip(rest, reference[stop:]):
            assert key == ref_key
            assert torch.equal(image, ref_image), "same augmentation after resume"


def test_resume_is_exact_across_undecodable_samples(tmp_path):
    urls = _write_shards(tmp_path, [10, 10, 10, 10], corrupt={"s00003", "s00012", "s00025"})
    make = functools.partial(ShardLoader, urls, batch_size=3, num_workers=2, shuffle_buffer=5, seed=2)
    reference = _keys(make())
    assert not {"s00003", "s00012", "s00025"} & {k for b in reference for k in b}
    for stop in range(1, len(reference)):
        first = make()
        assert _keys(first, stop) == reference[:stop]
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert _keys(resumed) == reference[stop:]
    loader = make()
    _keys(loader, len(reference) - 1)
    assert loader.skipped["undecodable_samples"] >= 1


def test_undecodable_sample_raises_when_asked(tmp_path):
    urls = _write_shards(tmp_path, [10], corrupt={"s00004"})
    with pytest.raises(SampleDecodeError, match="s00004"):
        _keys(ShardLoader(urls, batch_size=2, on_error="raise", shuffle_buffer=1))


@pytest.mark.parametrize("boundary", [512, 4096])
def test_a_shard_cut_at_a_block_boundary_is_skipped_counted_and_warned_once(tmp_path, caplog, boundary):
    urls = _write_shards(tmp_path, [20, 20])
    data = open(urls[1], "rb").read()
    with open(urls[1], "wb") as handle:
        handle.write(data[: len(data) // 2 // boundary * boundary])  # a copy cut at a block boundary
    loader = ShardLoader(urls, batch_size=4, num_workers=2, samples_per_epoch=40, shuffle_buffer=4)
    for _ in range(2):  # both workers read both shards (fewer shards than slots), twice
        for batch in loader:
            assert batch["image"].shape[0] == batch["label"].shape[0] == 4, "no sample with missing fields"
    assert list(loader.damaged_shards) == [urls[1]] and loader.damaged_shards[urls[1]]["reads"] >= 2
    assert "cut short" in loader.damaged_shards[urls[1]]["error"]
    assert loader.skipped["damaged_shards"] == 1
    assert len([r for r in caplog.records if urls[1] in r.getMessage()]) == 1, "one warning per shard"
    resumed = ShardLoader(urls, batch_size=4, num_workers=2, samples_per_epoch=40, shuffle_buffer=4)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.damaged_shards == loader.damaged_shards, "the count survives a checkpoint"


def test_a_damaged_shard_raises_when_asked(tmp_path):
    urls = _write_shards(tmp_path, [10, 10])
    data = open(urls[0], "rb").read()
    open(urls[0], "wb").write(data[:4096])
    with pytest.raises(DamagedShardError, match="train-000000.tar is damaged"):
        _keys(ShardLoader(urls, batch_size=2, samples_per_epoch=20, on_error="raise", shuffle_buffer=1))


def test_workers_ignore_stop_signals_meant_for_the_main_process(tmp_path):
    """SIGTERM to the process group (SLURM, ``timeout``) must not kill the workers: the main process
    handles it (checkpoints) and the epoch goes on."""
    urls = _write_shards(tmp_path, [12, 12, 12, 12])
    make = functools.partial(ShardLoader, urls, batch_size=3, num_workers=2, shuffle_buffer=4, seed=4)
    reference = _keys(make())
    received = []
    others = set(_children())  # e.g. the reference loader's workers still exiting, an earlier test's process
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: received.append(sig))
    try:
        keys = []
        for batch in make():
            keys.append(tuple(batch["key"]))
            if len(keys) == 2:
                workers = [pid for pid in _children() if pid not in others]
                assert len(workers) == 2
                for sig in ("TERM", "INT", "USR1"):  # from another process, as SLURM's or kill's
                    subprocess.run(["kill", f"-{sig}", *map(str, workers)], check=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
                assert set(workers) <= set(_children()), "the workers are alive"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]
    assert keys == reference


def _children() -> list[int]:
    """Live child processes of this one (the DataLoader workers)."""
    mine = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, ...
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                mine.append(int(entry))
    return sorted(mine)


def test_changed_layout_refuses_to_resume(tmp_path):
    urls = _write_shards(tmp_path, [10, 10])
    first = ShardLoader(urls, batch_size=2, num_workers=0)
    _keys(first, 2)
    other = ShardLoader(urls, batch_size=4, num_workers=0)
    with pytest.raises(StreamError, match="batch_size: 2 -> 4"):
        other.load_state_dict(first.state_dict())


def test_too_little_data_for_one_batch_is_a_clear_error(tmp_path):
    urls = _write_shards(tmp_path, [3])
    with pytest.raises(StreamError, match="no full batch"):
        ShardLoader(urls, batch_size=4, world_size=1)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_streaming_over_http_equals_local(tmp_path):
    urls = _write_shards(tmp_path, [9, 14, 6])
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        remote = f"http://127.0.0.1:{port}/train-{{000000..000002}}.tar"
        kwargs = dict(batch_size=3, num_workers=2, shuffle_buffer=5, seed=9)
        assert _keys(ShardLoader(remote, **kwargs)) == _keys(ShardLoader(urls, **kwargs))
    finally:
        server.shutdown()


def test_unreachable_url_fails_fast_with_a_clear_error():
    start = time.monotonic()
    with pytest.raises(StreamError, match="cannot reach http://127.0.0.1:9/"):
        ShardLoader("http://127.0.0.1:9/train-000000.tar", batch_size=2, timeout=5)
    assert time.monotonic() - start < 10


def test_pipe_urls_are_read(tmp_path):
    urls = _write_shards(tmp_path, [6])
    pipe = f"pipe:cat {urls[0]}"
    assert _keys(ShardLoader(pipe, batch_size=2, shuffle_buffer=1)) == _keys(
        ShardLoader(urls, batch_size=2, shuffle_buffer=1)
    )
