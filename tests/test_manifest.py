import json

import pytest

from pipeline import atomic, config, manifest
from pipeline.manifest import StageInputError


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
    assert found["outputs"] == [{"path": "out.bin", "bytes": 10, "sha256": manifest.sha256_file(cfg.stage_dir("a") / "out.bin"), "count": 1}]
    assert found["metrics"] == {"loss": 0.5}
    assert found["versions"]["torch"] and found["started_at"] and found["finished_at"]
    assert config.load(cfg.stage_dir("a") / "config.yaml") == cfg


def test_failed_stage_is_marked_failed(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError):
        with manifest.stage_run(cfg, "a", ["data"]):
            raise RuntimeError("boom")
    found = manifest.read(cfg.stage_dir("a"))
    assert found["status"] == "failed" and "boom" in found["error"]


def test_missing_and_incomplete_inputs_are_refused(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(StageInputError, match="run `latentpipe a` first"):
        manifest.check_inputs(cfg, ["a"])
    with pytest.raises(KeyboardInterrupt):
        with manifest.stage_run(cfg, "a", ["data"]):
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
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as handle:
            handle.write('{"v": 2, "trunc')
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
