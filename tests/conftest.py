import os

import pytest
import torch

# The `slow` marker (pyproject's markers), given here by path so that test files need not repeat
# it: end-to-end stages, the local SLURM cluster, multi-process runs, and single tests measured
# among the slowest with `pytest --durations`. `pytest -m "not slow"` is the fast loop.
SLOW_PATHS = (
    "tests/stages/",
    "tests/slurm/",
    "tests/runtime/test_processes.py",
    "tests/autoencoder/test_codebook_ranks.py",
    "tests/metrics/test_classifier.py",  # trains the digit classifier
)
SLOW_TESTS = frozenset(  # measured 2026-12-02 (loaded machine: 7-66 s each, 60% of the remaining time)
    {
        "tests/metrics/test_features.py::test_real_network_features",
        "tests/networks/test_network_options.py::test_torch_compile_captures_one_graph",
        "tests/networks/test_network_options.py::test_inductor_compiled_dit_matches_eager",
        "tests/data/test_stream.py::test_resume_is_exact_across_undecodable_samples",
        "tests/data/test_stream.py::test_exact_resume_yields_the_uninterrupted_batches",
        "tests/diffusion/test_gmm.py::test_condition_matches_brute_force_bayes",
        "tests/diffusion/test_likelihood.py::test_hutchinson_is_unbiased_for_the_exact_trace",
        "tests/runtime/test_logging.py::test_weights_and_biases_offline_gets_the_scalars",
    }
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_PATHS) or item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if (
            item.get_closest_marker("gpu") is not None
        ):  # not `in item.keywords`: that also matches a directory named gpu
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
