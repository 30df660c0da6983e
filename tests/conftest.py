"""Shared fixtures: tiny generated image folders and the real photo set when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY = "tests.tiny_backbone:tiny_cnn"
HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera"
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}


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
