import os

import pytest
import torch


# The `slow` marker (pyproject's markers), given here by path so that test files need not repeat
# it: end-to-end stages, the local SLURM cluster, multi-process runs, and single tests measured
# over ~5 s on the 2-core CI machine (`pytest --durations`). `pytest -m "not slow"` is the fast loop.
SLOW_PATHS = (
    "tests/stages/",
    "tests/slurm/",
    "tests/runtime/test_processes.py",
    "tests/autoencoder/test_codebook_ranks.py",
)
SLOW_TESTS = frozenset()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_PATHS) or item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
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
        pytest.skip(
            f"weights {absent} not in {weights.cache_dir()}; run `{weights.FETCH_COMMAND}` (or set LATENTPIPE_CACHE)"
        )
    return weights.cache_dir()


@pytest.fixture(scope="session")
def lpips_cache():
    return _cached_weights(["lpips-alex", "lpips-vgg"])


@pytest.fixture(scope="session")
def weights_cache():
    from pipeline import weights

    return _cached_weights(list(weights.REGISTRY))
