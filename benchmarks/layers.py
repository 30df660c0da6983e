"""Several layers in one pass: ``extract --layer A,B`` against one ``extract --layer X`` per layer.

Both ways start from an empty store and end with the same sets (same keys, same rows). The
two ways alternate (one pass first, then separate first, ...) in ``repeats`` pairs, so a pair
shares its moment on a machine whose speed drifts; the ratio is the median of the pairs' ratios.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import featcache
from featcache.data import scan

__all__ = ["run_layers"]


def _one_pass(backbone: str, layers: list[str], weights: str, data: str, store: str, **kw) -> tuple[float, list[str]]:
    t = time.perf_counter()
    r = featcache.extract(backbone=backbone, layer=list(layers), weights=weights, data=data, store=store, **kw)
    return time.perf_counter() - t, [x.set_key for x in r]


def _separate(backbone: str, layers: list[str], weights: str, data: str, store: str, **kw) -> tuple[float, list[str]]:
    t = time.perf_counter()
    keys = [featcache.extract(backbone=backbone, layer=layer, weights=weights, data=data, store=store, **kw).set_key
            for layer in layers]
    return time.perf_counter() - t, keys


def run_layers(data: str, backbone: str, layers: list[str], weights: str = "DEFAULT", repeats: int = 3,
               workers: int | None = None, batch_size: int = 64) -> dict:
    """Seconds for k layers in one pass and for k separate extracts, each into a fresh store."""
    kw = dict(workers=workers, batch_size=batch_size)
    pairs: list[tuple[float, float]] = []
    tmp = Path(tempfile.mkdtemp(prefix="featcache-layers-"))
    try:
        featcache.extract(backbone=backbone, layer=layers[0], weights=weights, data=data,
                          store=str(tmp / "warm.zarr"), **kw)  # warm-up: files in the page cache, libraries loaded
        for i in range(repeats):
            runs = {}
            for way in (("one", "separate") if i % 2 == 0 else ("separate", "one")):
                run = _one_pass if way == "one" else _separate
                runs[way] = run(backbone, layers, weights, data, str(tmp / f"{way}{i}.zarr"), **kw)
            if runs["one"][1] != runs["separate"][1]:
                raise AssertionError(f"one pass made sets {runs['one'][1]}, separate extracts {runs['separate'][1]}")
            pairs.append((runs["one"][0], runs["separate"][0]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [s / o for o, s in pairs]
    return {"backbone": backbone, "layers": ",".join(layers), "k": len(layers), "images": len(scan(data).items),
            "weights": weights, "repeats": repeats,
            "one_pass_s": float(np.median([o for o, _ in pairs])), "separate_s": float(np.median([s for _, s in pairs])),
            "ratio": float(np.median(ratios)), "ratios": [round(x, 3) for x in ratios],
            "pairs": [[round(o, 3), round(s, 3)] for o, s in pairs]}
