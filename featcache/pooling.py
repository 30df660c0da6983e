"""Pooling of stored rows, in one place: spatial maps to vectors for heads that take vectors.

``extract --pool`` pools before storing (the backbones' own pooling modules); ``fit --fit-pool``
and every reader of stored rows pool here, so a run's rows are prepared the same way wherever
they are read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["prepare_features", "prepared_shape", "pool_tensor"]


def prepare_features(x: np.ndarray, pool: str = "none") -> np.ndarray:
    """Stored rows → float32 2-D matrix: spatial maps pooled (``avg``/``max``) or flattened."""
    import numpy as np

    if x.ndim == 4 and pool == "avg":
        x = x.mean(axis=(2, 3), dtype=np.float32)
    elif x.ndim == 4 and pool == "max":
        x = x.max(axis=(2, 3))
    return x.reshape(len(x), -1).astype(np.float32, copy=False)


def prepared_shape(shape: tuple[int, ...], pool: str, keep_shape: bool) -> tuple[int, ...]:
    """Shape of one row after ``prepare_features`` (or as stored, for heads that take maps); without NumPy."""
    if keep_shape:
        return tuple(shape)
    if len(shape) == 3 and pool in ("avg", "max"):
        return (shape[0],)
    return (int(math.prod(shape)),)


def pool_tensor(x, pool: str):
    """A torch batch of spatial maps (N, C, H, W) pooled to (N, C) (``avg``/``max``), as ``prepare_features`` pools
    stored rows for a run; anything else is returned as it is (the exported model pools with it).

    ``extract --pool`` is not this: pooling before storing is part of the network's cut
    (``backbones.base.pool_map``, torch's adaptive pooling) and of the feature space's key."""
    if x.ndim == 4 and pool == "avg":
        return x.mean(dim=(2, 3))
    if x.ndim == 4 and pool == "max":
        return x.amax(dim=(2, 3))
    return x
