import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
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
