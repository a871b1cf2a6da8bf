import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: that also matches a directory named gpu
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _offline_and_single_threaded(monkeypatch):
    # Tests never reach a hub; the CI machine has two cores shared by xdist workers.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("LATENTPIPE_TEST_THREADS", "1")))


def _cached_weights(names):
    """The weight cache, after checking it holds ``names``. Tests never download: CI fills the
    cache with `latentpipe weights fetch` and sets LATENTPIPE_REQUIRE_WEIGHTS=1, so a missing
    file fails there instead of skipping."""
    from pipeline import weights

    absent = weights.missing(names)
    if absent and not os.environ.get("LATENTPIPE_REQUIRE_WEIGHTS"):
        pytest.skip(f"weights {absent} not in {weights.cache_dir()}; run `{weights.FETCH_COMMAND}` "
                    f"(or set LATENTPIPE_CACHE)")
    return weights.cache_dir()


@pytest.fixture(scope="session")
def lpips_cache():
    return _cached_weights(["lpips-alex", "lpips-vgg"])


@pytest.fixture(scope="session")
def weights_cache():
    from pipeline import weights

    return _cached_weights(list(weights.REGISTRY))
