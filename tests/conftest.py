"""Shared fixtures and helpers: tiny generated image folders, ``extract_tiny``, the real photo
set when present; the ``slow`` and ``gpu`` markers; a guard that no test leaks RNG state.

``pytest -q`` (``make test``, what CI runs) runs every test, slow ones included; ``--skip-slow``
is the quick local loop. ``gpu`` tests are skipped, and reported as such, without CUDA.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY = "tests.tiny_backbone:tiny_cnn"
HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera"
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}


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
    """Each test's scans remember their hashes in a folder of its own, never in the user's cache."""
    monkeypatch.setenv("FEATCACHE_SCAN_CACHE", str(tmp_path_factory.mktemp("scan-cache")))


@pytest.fixture(autouse=True)
def _no_leaking_rng():
    """Each test leaves the global random generators (torch, NumPy, random) as it found them."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def extract_tiny(data, store, **kw):
    """``featcache.extract`` with the tiny test backbone, random weights and no worker processes."""
    import featcache

    kw.setdefault("backbone", TINY)
    kw.setdefault("weights", "none")
    kw.setdefault("workers", 0)
    return featcache.extract(data=str(data), store=str(store), **kw)


def make_folder(root: Path, splits=(("train", 8), ("val", 4)), classes=COLOURS, size=(24, 30), seed=0) -> Path:
    """ImageFolder of noisy solid-colour PNGs: classes separable by colour alone."""
    rng = np.random.default_rng(seed)
    for split, n in splits:
        for name, colour in classes.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-30, 30, size + (3,)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


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
