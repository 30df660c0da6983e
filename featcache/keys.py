"""The key recipes, in one place: a row's key, a feature space's key and a set's key.

A row is stored under the SHA-256 of the image bytes that were decoded (``<hex>``), an augmented
view of it under ``<hex>:<view>``. A space's key is a digest of its provenance, a set's key a
digest of what the set is (its space, its view's digest, its folder, its split). Everything that
builds or checks one of these keys calls a function here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["digest_key", "space_key", "set_key", "row_key"]


def digest_key(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def space_key(provenance: dict) -> str:
    """Short, stable key of a feature space (backbone, layer, weights digest, preprocessing, precision, pool, dtype)."""
    return digest_key(provenance, 16)


def set_key(space: str, view_digest: str, data_root: str, split_fractions, split_seed: int | None, views: int = 0,
            view_space: str | None = None) -> str:
    """A set's key: 12 hex digits of what the set is. Identical copies of a folder in two places share rows, not
    a set record (``data_root`` is part of it)."""
    return digest_key({"space": space, "view": view_digest, "data_root": data_root,
                       "split_fractions": list(split_fractions) if split_fractions else None, "split_seed": split_seed,
                       **({"views": views, "view_space": view_space} if views else {})}, 12)


def row_key(sha256: str, view: int | None = None) -> str:
    """The key a row is stored under: the image's SHA-256 hex, with ``:<view>`` for augmented view ``view``."""
    return sha256 if view is None else f"{sha256}:{int(view)}"
