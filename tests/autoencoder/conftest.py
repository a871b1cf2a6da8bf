import os

import pytest

from pipeline import weights


@pytest.fixture(scope="session")
def lpips_cache():
    """The weight cache holding both LPIPS files. Tests never download: CI fills the cache with
    `latentpipe weights fetch` and sets LATENTPIPE_REQUIRE_WEIGHTS=1 so absence fails loudly."""
    absent = weights.missing(["lpips-alex", "lpips-vgg"])
    if absent and not os.environ.get("LATENTPIPE_REQUIRE_WEIGHTS"):
        pytest.skip(f"weights {absent} not in {weights.cache_dir()}; run "
                    f"`{weights.FETCH_COMMAND}` (or set LATENTPIPE_CACHE)")
    return weights.cache_dir()
