import contextlib
import json

import pytest

from pipeline import atomic, config, manifest
from pipeline.data.stream import ShardLoader
from pipeline.manifest import StageInputError
from tests.data.test_stream import _write_shards


def _cfg(tmp_path, *overrides):
    return config.load(overrides=[f"experiment.runs_dir={tmp_path}", *overrides])


def _complete(cfg, stage, inputs=()):
    with manifest.stage_run(cfg, stage, ["data"], inputs) as record:
        (record.directory / "out.bin").write_bytes(b"x" * 10)
        record.add_output(record.directory / "out.bin", count=1)
        record.metrics["loss"] = 0.5


def test_complete_manifest_records_config_outputs_and_provenance(tmp_path):
    cfg = _cfg(tmp_path)
    _complete(cfg, "a")
    found = manifest.read(cfg.stage_dir("a"))
    assert found["status"] == "complete"
    assert found["config_hash"] == config.section_hash(cfg, ["data"])
    assert found["outputs"] == [
        {"path": "out.bin", "bytes": 10, "sha256": manifest.sha256_file(cfg.stage_dir("a") / "out.bin"), "count": 1}
    ]
    assert found["metrics"] == {"loss": 0.5}
    assert found["versions"]["torch"] and found["started_at"] and found["finished_at"]
    assert config.load(cfg.stage_dir("a") / "config.yaml") == cfg


def test_failed_stage_is_marked_failed(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError), manifest.stage_run(cfg, "a", ["data"]):
        raise RuntimeError("boom")
    found = manifest.read(cfg.stage_dir("a"))
    assert found["status"] == "failed" and "boom" in found["error"]


def test_missing_and_incomplete_inputs_are_refused(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(StageInputError, match="run `latentpipe a` first"):
        manifest.check_inputs(cfg, ["a"])
    with pytest.raises(KeyboardInterrupt), manifest.stage_run(cfg, "a", ["data"]):
        raise KeyboardInterrupt
    with pytest.raises(StageInputError, match="not complete"):
        manifest.check_inputs(cfg, ["a"])


def test_inputs_from_a_different_upstream_are_refused_naming_both_hashes(tmp_path):
    cfg = _cfg(tmp_path)
    _complete(cfg, "a")
    _complete(cfg, "b", inputs=["a"])
    recorded = manifest.manifest_hash(cfg.stage_dir("a"))
    manifest.check_inputs(cfg, ["a", "b"])  # consistent
    _complete(cfg, "a")  # a is redone: b was made from the old a
    current = manifest.manifest_hash(cfg.stage_dir("a"))
    assert current != recorded
    with pytest.raises(StageInputError) as err:
        manifest.check_inputs(cfg, ["a", "b"])
    assert recorded[:12] in str(err.value) and current[:12] in str(err.value)


def test_up_to_date_tracks_config_and_inputs(tmp_path):
    cfg = _cfg(tmp_path)
    _complete(cfg, "a")
    _complete(cfg, "b", inputs=["a"])
    assert manifest.up_to_date(cfg, "b", ["data"], ["a"]) == (True, "complete")
    changed = _cfg(tmp_path, "data.resolution=8")
    assert manifest.up_to_date(changed, "b", ["data"], ["a"])[1].startswith("config changed")
    _complete(cfg, "a")
    assert manifest.up_to_date(cfg, "b", ["data"], ["a"]) == (False, "input 'a' changed")


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic.write_text(target, json.dumps({"v": 1}))
    with pytest.raises(RuntimeError), atomic.atomic_open(target, "w") as handle:
        handle.write('{"v": 2, "trunc')
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("refusal", [StageInputError("foreign upstream"), config.ConfigError("bad key")])
def test_a_refused_command_leaves_manifest_and_config_as_they_were(tmp_path, refusal):
    cfg = _cfg(tmp_path)
    _complete(cfg, "a")
    directory = cfg.stage_dir("a")
    before = {name: (directory / name).read_bytes() for name in (manifest.MANIFEST, "config.yaml")}
    with pytest.raises(type(refusal)), manifest.stage_run(_cfg(tmp_path, "data.resolution=8"), "a", ["data"]):
        raise refusal
    assert {name: (directory / name).read_bytes() for name in before} == before
    assert manifest.up_to_date(cfg, "a", ["data"], [])[0]


def test_a_refusal_in_a_new_stage_directory_leaves_no_manifest(tmp_path):
    with pytest.raises(StageInputError), manifest.stage_run(_cfg(tmp_path), "a", ["data"]):
        raise StageInputError("refused")
    assert manifest.read(_cfg(tmp_path).stage_dir("a")) is None


@pytest.mark.parametrize("fails", [False, True])
def test_damaged_shards_of_watched_loaders_are_recorded_per_shard(tmp_path, fails):
    """A real loader over a shard cut short: the manifest names the shard, complete or failed."""
    urls = _write_shards(tmp_path / "shards", [20, 20])
    data = open(urls[1], "rb").read()
    with open(urls[1], "wb") as handle:
        handle.write(data[: len(data) // 2 // 512 * 512])
    cfg, loader = _cfg(tmp_path), ShardLoader(urls, batch_size=4, samples_per_epoch=40, shuffle_buffer=4)
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with manifest.stage_run(cfg, "a", ["data"]) as record:
            record.watch(loader)
            for _ in loader:
                pass
            if fails:
                raise RuntimeError("boom")
    recorded = manifest.read(cfg.stage_dir("a"))["damaged_shards"]
    assert list(recorded) == [urls[1]] and recorded[urls[1]]["reads"] >= 1 and "cut short" in recorded[urls[1]]["error"]
