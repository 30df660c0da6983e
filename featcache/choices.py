"""The option vocabulary and the limits: one source for the command line, the library and the store.

Nothing here imports more than the standard library, so ``--help`` is built from these names
without loading torch or numpy, and every module below the command line takes its lists from here.
"""

from __future__ import annotations

import os

__all__ = ["POOLS", "PRECISIONS", "RECORDED_PRECISIONS", "DTYPES", "HEADS", "INITS", "OPTIMIZERS", "FIT_POOLS",
           "DEVICES", "ENGINES", "RUN_SORTS", "TRACKERS", "SPLITS", "MAX_CLASSES", "DEFAULT_NAME_PATTERN",
           "default_store_url"]

POOLS = ("none", "avg", "max")  # store-time pooling of spatial maps (extract --pool)
PRECISIONS = ("auto", "float32", "tf32", "bfloat16", "float16")  # requested: extract --precision
RECORDED_PRECISIONS = ("float32", "tf32", "bfloat16", "float16", "unrecorded")  # in a set; unrecorded: migrated from format 1
DTYPES = ("float16", "float32")
HEADS = ("mlp", "linear", "rest", "logreg", "svm")  # --head names; featcache.heads maps each to its class
INITS = ("random", "probe")
OPTIMIZERS = ("adam", "sgd")
FIT_POOLS = ("none", "avg", "max")  # train-time pooling of stored maps (fit --fit-pool)
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("local", "ray")  # extract --engine
RUN_SORTS = ("time", "val", "test", "head", "run")  # featcache runs --sort
TRACKERS = ("mlflow", "tensorboard")  # fit --tracker; featcache.tracking has one adapter each
DEFAULT_NAME_PATTERN = r"^([^._]+)[._]"

SPLITS = ("train", "val", "test")  # the splits a set holds, in this order
MAX_CLASSES = 100_000  # classes in a set and in a head (a larger list in a store or run file is refused)


def default_store_url() -> str:
    """``$FEATCACHE_STORE`` or ``featcache.zarr`` (an empty variable counts as unset)."""
    return os.environ.get("FEATCACHE_STORE") or "featcache.zarr"
