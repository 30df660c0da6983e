"""A set's rows where users work: NumPy, torch (``Dataset`` in memory, ``IterableDataset`` for sets
larger than memory), pandas and Hugging Face ``datasets``.

Rows come as float32 by default (stored float16 rows are upcast exactly), optionally pooled
(``pool="avg"``/``"max"`` over the spatial axes of feature maps). ``dtype="float16"`` gives the
stored values themselves; a float32 store whose values do not fit float16 is refused rather
than turned into infinities. These are :class:`~featcache.store.FeatureSet` methods
(``fs.to_torch("train")``, ``fs.dataset("train")``, ...); torch, pandas and datasets are imported
only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..choices import FIT_POOLS
from ..errors import FeatcacheError
from ..stream import RowReader, as_dtype, memory_budget

if TYPE_CHECKING:
    from .sets import FeatureSet

__all__ = ["DTYPES", "rows", "to_numpy", "to_torch", "dataset", "iterable_dataset", "to_pandas", "to_hf"]

DTYPES = ("float32", "float16")


def _check(fs: FeatureSet, split: str | None, dtype: str, pool: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if pool not in FIT_POOLS:
        raise ValueError(f"pool must be one of {', '.join(FIT_POOLS)}; got {pool!r}")
    if split is not None and split not in fs.splits:
        fs.labels(split)  # the set's own SetNotFound, naming the splits it has


def rows(fs: FeatureSet, split: str, dtype: str = "float32", pool: str = "none") -> np.ndarray:
    """The split's rows in set order: (N, *shape) as stored, or (N, C) pooled."""
    _check(fs, split, dtype, pool)
    if dtype == "float16" and pool == "none" and fs.record.dtype == "float16":
        return fs.features(split)  # exactly what is stored
    x = RowReader(fs.store, fs.space, fs.hashes(split), fs.shape, pool, keep_shape=pool == "none",
                  hint=fs.locations(split)).load()
    return as_dtype(x, dtype, f"set {fs.key} split {split}")


def to_numpy(fs: FeatureSet, split: str, dtype: str = "float32", pool: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels): rows as :func:`rows` gives them, labels int64 class indices (-1: unlabelled)."""
    return rows(fs, split, dtype, pool), fs.labels(split).astype(np.int64)


def to_torch(fs: FeatureSet, split: str, dtype: str = "float32", pool: str = "none"):
    """(rows, labels) as torch tensors: float32 rows ``nn.Linear`` takes, int64 labels ``CrossEntropyLoss`` takes."""
    import torch

    x, y = to_numpy(fs, split, dtype, pool)
    return torch.from_numpy(x), torch.from_numpy(y)


def dataset(fs: FeatureSet, split: str, dtype: str = "float32", pool: str = "none"):
    """A map-style ``torch.utils.data.Dataset`` of (row, label) held in memory (``len``, indexing,
    any ``DataLoader`` sampler)."""
    from .torchdata import InMemoryRows

    return InMemoryRows(*to_torch(fs, split, dtype, pool))


def iterable_dataset(fs: FeatureSet, split: str, dtype: str = "float32", pool: str = "none", shuffle: bool = True,
                     seed: int = 0, max_memory: str | int = "auto"):
    """A ``torch.utils.data.IterableDataset`` of (row, label) for a split larger than memory: stored
    chunks are read a window at a time (at most two windows of ``max_memory / 2`` alive), in a new
    order each epoch with the rows of a window shuffled (``set_epoch(e)``, as DistributedSampler),
    and split between ``DataLoader`` workers by chunk so each row comes once per epoch."""
    from .torchdata import StreamingRows

    _check(fs, split, dtype, pool)
    return StreamingRows(fs, split, dtype, pool, shuffle, seed, memory_budget(max_memory) // 2)


def _need(package: str, what: str, extra: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise FeatcacheError(f"{what} needs {package}: pip install {extra}") from None


def _records(fs: FeatureSet, split: str, dtype: str, pool: str) -> dict[str, Any]:
    x, y = to_numpy(fs, split, dtype, pool)
    names = np.array(fs.classes + [None], dtype=object)  # -1 (unlabelled) → None
    return {"path": fs.paths(split), "split": [split] * len(y), "label": names[y].tolist(), "label_id": y,
            "sha256": fs.hashes(split).tolist(), "features": x.reshape(len(x), -1)}


def to_pandas(fs: FeatureSet, split: str | None = None, dtype: str = "float32", pool: str = "none"):
    """One row per image (every split, or ``split``): path, split, label (class name), label_id,
    sha256, and ``features`` (the flattened row as a NumPy array). Needs pandas."""
    pd = _need("pandas", "to_pandas", "pandas")
    _check(fs, split, dtype, pool)
    frames = []
    for s in [split] if split else fs.splits:
        rec = _records(fs, s, dtype, pool)
        rec["features"] = list(rec["features"])
        frames.append(pd.DataFrame(rec))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def to_hf(fs: FeatureSet, split: str | None = None, dtype: str = "float32", pool: str = "none"):
    """A Hugging Face ``datasets.Dataset`` of ``split`` (a ``DatasetDict`` of every split without one):
    ``features`` (flattened, a fixed-length sequence), ``label`` (a ``ClassLabel`` of the set's
    classes; -1 where unlabelled), path, sha256. Needs datasets (``pip install datasets``)."""
    ds = _need("datasets", "to_hf", "datasets")
    _check(fs, split, dtype, pool)

    def one(s: str):
        rec = _records(fs, s, dtype, pool)
        x = rec["features"]
        schema = ds.Features({"features": ds.Sequence(ds.Value(dtype), length=x.shape[1]),
                              "label": ds.ClassLabel(names=fs.classes), "path": ds.Value("string"),
                              "sha256": ds.Value("string")})
        return ds.Dataset.from_dict({"features": x, "label": rec["label_id"], "path": rec["path"],
                                     "sha256": rec["sha256"]}, features=schema, split=s)

    if split:
        return one(split)
    return ds.DatasetDict({s: one(s) for s in fs.splits})
