"""Fixtures and pytest hooks only (what test modules import lives in ``tests/helpers.py``): a tiny
generated image folder, a store path, the real photo set when present (and its efficientnet_lite0
store, extracted once per session); the ``slow`` and ``gpu``
markers; a private scan cache and provenance cache per test; a guard that no test leaks RNG state.

``pytest -q`` (``make test``, what CI runs) runs every test, slow ones included; ``--skip-slow``
is the quick local loop. ``gpu`` tests are skipped, and reported as such, without CUDA.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from .helpers import HYMENOPTERA, make_folder


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-slow", action="store_true", help="Leave out tests marked slow (the quick local loop).")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run without --skip-slow")
    no_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and config.getoption("--skip-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _own_scan_cache(tmp_path_factory, monkeypatch):
    """Each test's scans remember their hashes, and its extracts their provenances, in folders of its own, never in
    the user's cache."""
    monkeypatch.setenv("FEATCACHE_SCAN_CACHE", str(tmp_path_factory.mktemp("scan-cache")))
    monkeypatch.setenv("FEATCACHE_PROVENANCE_CACHE", str(tmp_path_factory.mktemp("provenance-cache")))


@pytest.fixture(autouse=True)
def _no_leaking_rng():
    """Each test leaves the global random generators (torch, NumPy, random) as it found them."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return str(tmp_path / "store.zarr")


@pytest.fixture
def hymenoptera() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real photo set not present at {HYMENOPTERA}")
    return HYMENOPTERA


@pytest.fixture(scope="session")
def lite0_hymenoptera(tmp_path_factory):
    """The real photo set through pretrained efficientnet_lite0 at the defaults (pooled), extracted
    once for the tests that only read it (fit opens the store read-only): ``(store URL, result)``."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real photo set not present at {HYMENOPTERA}")
    pytest.importorskip("efficientnet_lite_pytorch")
    import featcache

    store = str(tmp_path_factory.mktemp("lite0-hymenoptera") / "s.zarr")
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:  # made before any test's own RNG guard starts: it guards itself
        with pytest.MonkeyPatch.context() as mp:  # and before any test's own caches: none in the user's
            for var in ("FEATCACHE_SCAN_CACHE", "FEATCACHE_PROVENANCE_CACHE"):
                mp.setenv(var, str(tmp_path_factory.mktemp(var.lower())))
            result = featcache.extract(backbone="efficientnet_lite0", data=str(HYMENOPTERA), store=store)
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    return store, result
