"""Bytes per image and write/read speed of the same features under different codecs.

The features come from a real extract (spatial and pooled), then each codec writes and
reads them with the chunk and shard layout the store itself uses.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

import featcache
from featcache.store.segments import _row_layout

__all__ = ["CODECS", "run_storage"]

CODECS: dict[str, list | None] = {
    "none": None,
    "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")],
    "lz4+shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "zstd1": [BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")],
    "zstd1+shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    "zstd3": [BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")],
    "zstd3+shuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "zstd3+bitshuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "zstd9+shuffle": [BloscCodec(cname="zstd", clevel=9, shuffle="shuffle")],
}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _one(features: np.ndarray, codec: str, folder: Path, repeats: int) -> dict:
    n, shape = len(features), features.shape[1:]
    chunk, shard = _row_layout(n, shape, features.dtype.itemsize)
    write_s, read_s = [], []
    for r in range(repeats):
        path = folder / f"{codec}-{r}.zarr"
        t = time.perf_counter()
        arr = zarr.create_array(
            str(path), shape=features.shape, chunks=(chunk,) + shape, shards=(shard,) + shape,
            dtype=features.dtype, compressors=CODECS[codec],
        )
        arr[:] = features
        write_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        back = zarr.open_array(str(path), mode="r")[:]
        read_s.append(time.perf_counter() - t)
        assert np.array_equal(back, features)
    stored = _dir_bytes(folder / f"{codec}-0.zarr")
    raw = features.nbytes
    return {
        "codec": codec,
        "dtype": str(features.dtype),
        "shape": "x".join(map(str, shape)),
        "bytes_per_image": stored / n,
        "ratio": raw / stored,
        "write_gbs": raw / min(write_s) / 1e9,
        "read_gbs": raw / min(read_s) / 1e9,
    }


def run_storage(
    data: str,
    backbone: str = "efficientnet_lite0",
    spatial_layer: str = "head",
    weights: str = "DEFAULT",
    codecs: list[str] | None = None,
    repeats: int = 3,
    workers: int | None = None,
) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featcache-storage-"))
    rows = []
    try:
        sets = {}
        for label, layer, pool in (("spatial", spatial_layer, "none"), ("pooled", None, None)):
            r = featcache.extract(
                backbone=backbone, layer=layer, pool=pool, weights=weights, data=data,
                store=str(tmp / "src.zarr"), dtype="float32", workers=workers,
            )
            fs = featcache.open_store(str(tmp / "src.zarr")).get_set(r.set_key)
            sets[label] = np.concatenate([fs.features(s) for s in fs.splits])
        for label, feats in sets.items():
            for dtype in ("float16", "float32"):
                x = feats.astype(dtype)
                for codec in codecs or list(CODECS):
                    folder = tmp / f"{label}-{dtype}"
                    folder.mkdir(exist_ok=True)
                    rows.append({"features": label, **_one(x, codec, folder, repeats)})
                    shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"backbone": backbone, "weights": weights, "images": int(len(next(iter(sets.values())))), "rows": rows}
