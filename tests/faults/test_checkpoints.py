"""Checkpoints under faults (issue 15, "Why" items 1 and 9): damaged files are detected by the
sha256 in complete.json and skipped for the one before; a full disk and an unsaveable state are
messages naming the file; so is a full disk under a shard writer."""

import builtins
import contextlib
import json
import logging

import pytest
import torch

from pipeline import atomic
from pipeline.data import shards
from pipeline.runtime import checkpoint
from pipeline.runtime.dist import Runtime


def _save(directory, step, value):
    return checkpoint.save(
        directory,
        step,
        {"w": torch.full((64,), float(value)), "step": step},
        {"loader": {"position": step}},
        Runtime(),
        keep=3,
        resume_key="k",
    )


def test_complete_json_records_every_file_with_its_sha256(tmp_path):
    path = _save(tmp_path, 1, 1.0)
    files = json.loads((path / "complete.json").read_text())["files"]
    assert files == {
        name: {"bytes": (path / name).stat().st_size, "sha256": atomic.sha256_file(path / name)}
        for name in ("rank-00000.pt", "state.pt")
    }


def test_the_elastic_state_is_hashed_and_replaces_the_rank_files_on_another_number_of_ranks(tmp_path):
    """elastic.pt (DeepSpeed ZeRO's optimiser state gathered whole) is what a job on another
    number of ranks gets as its own state; the same number of ranks gets its rank file."""
    whole = torch.arange(6.0)
    path = checkpoint.save(
        tmp_path, 1, {"step": 1}, {"part": whole[:3]}, Runtime(), keep=2, resume_key="k", elastic={"whole": whole}
    )
    assert set(json.loads((path / "complete.json").read_text())["files"]) == {"elastic.pt", "rank-00000.pt", "state.pt"}
    assert torch.equal(checkpoint.load(path, 0, 1)[1]["part"], whole[:3])
    assert torch.equal(checkpoint.load(path, 2, 3)[1]["whole"], whole)
    data = bytearray((path / "elastic.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "elastic.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="elastic.pt differs from what was written"):
        checkpoint.load(path, 2, 3)
    assert checkpoint.load(path, 0, 1)[1] is not None  # the same number of ranks does not read it
    assert checkpoint.load(_save(tmp_path, 2, 2.0), 1, 2)[1] is None  # nothing owned, nothing elastic (DDP)


@pytest.mark.parametrize("name", ["state.pt", "rank-00000.pt"])
def test_four_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous_one(tmp_path, caplog, name):
    _save(tmp_path, 1, 1.0)
    newest = _save(tmp_path, 2, 2.0)
    data = bytearray((newest / name).read_bytes())
    at = len(data) // 2  # inside the tensor data: torch.load alone would not notice (no zip CRC check)
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    (newest / name).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        path, shared, _ = checkpoint.load_latest(tmp_path, Runtime())
    assert path.name == "step-00000001" and shared["step"] == 1 and torch.equal(shared["w"], torch.ones(64))
    assert f"{newest} is unreadable" in caplog.text and "differs from what was written" in caplog.text


def test_a_truncated_newest_checkpoint_falls_back(tmp_path):
    _save(tmp_path, 1, 1.0)
    newest = _save(tmp_path, 2, 2.0)
    with open(newest / "state.pt", "r+b") as handle:
        handle.truncate(100)
    assert checkpoint.load_latest(tmp_path, Runtime())[0].name == "step-00000001"


@contextlib.contextmanager
def _full_disk(path, mode="wb"):
    """A fault-injecting ``atomic.atomic_open``: writes go to /dev/full (ENOSPC, as on a full disk)."""
    with open("/dev/full", mode) as handle:
        yield handle


def test_a_full_disk_while_checkpointing_is_a_message_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "atomic_open", _full_disk)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"cannot write checkpoint .*rank-00000\.pt: No space left "
        r"on device; free space there",
    ):
        _save(tmp_path, 1, 1.0)


def test_an_unsaveable_state_is_a_message_naming_the_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"state\.pt: the state holds an object torch cannot save"):
        checkpoint.save(tmp_path, 1, {"fn": lambda: 0}, {}, Runtime(), keep=1, resume_key="k")
    assert checkpoint.latest(tmp_path) is None


def test_a_full_disk_while_writing_shards_is_a_message():
    with pytest.raises(atomic.DiskFullError, match=r"no space left writing shards in /some/dir .*free space there"):
        with atomic.disk_full_as_error("shards", "/some/dir"), open("/dev/full", "wb") as handle:
            handle.write(b"x" * 100)


def test_a_full_disk_while_writing_a_shard_is_a_message(tmp_path, monkeypatch):
    """ShardWriter as prepare and encode use it, its shard file made a fault-injecting one (/dev/full)."""
    real_open = builtins.open
    monkeypatch.setattr(
        shards, "open", lambda path, mode="r": real_open("/dev/full" if "w" in mode else path, mode), raising=False
    )
    with (
        pytest.raises(
            atomic.DiskFullError,
            match=rf"no space left writing latent shard train-000000\.tar in "
            rf"{tmp_path}",
        ),
        atomic.disk_full_as_error("latent shard train-000000.tar", tmp_path),
    ):
        with shards.ShardWriter(tmp_path, "train", max_count=10, max_bytes=1 << 20) as writer:
            for i in range(50):
                writer.write({"__key__": f"{i:04d}", "npy": b"\0" * 8192})


def test_a_prune_killed_part_way_leaves_nothing_behind_after_the_next_save(tmp_path):
    """Pruning deletes complete.json first, so a kill mid-prune leaves an incomplete step
    directory (never a damaged "complete" one), and the next save removes it."""
    for step in (1, 2):
        _save(tmp_path, step, step)
    half_pruned = tmp_path / "step-00000000"  # as a killed rmtree leaves it: no complete.json, some files
    half_pruned.mkdir()
    (half_pruned / "state.pt").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name != half_pruned.name
    _save(tmp_path, 3, 3)
    assert not half_pruned.exists()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [p.name for p in sorted(checkpoint._complete(tmp_path))]
